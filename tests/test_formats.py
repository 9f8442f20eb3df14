"""Formats: numerics against the fp32 layer, exact bytes against real tensors, apply_policy.

SQNR floors (dB, output of a random Gaussian layer on Gaussian inputs, 64 tokens) were set
from measurements on this machine's torch 2.13 / bitsandbytes 0.50.2 / torchao 0.18, about
2-3 dB under the lowest value seen over the shapes below:
fp16 ~69, bf16 ~51, ao.int8wo ~48, bnb.int8 ~41 (activations quantized too), torch.int8dyn
~33-35 (per-tensor dynamic activations), rtn.int4 ~24, bnb.nf4 ~20.6, bnb.fp4 ~19.0,
rtn.int3 ~17.1, rtn.int2 ~9.9.
"""
from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.formats import (
    FORMATS,
    AppliedReport,
    CastFormat,
    ModuleBank,
    QuantizedLinear,
    apply_policy,
    available_formats,
    current_formats,
    get_format,
    module_bytes,
    policy_memory_bytes,
    register_format,
)
from mpsearch.formats.rtn import GROUP, pack_codes, unpack_codes
from mpsearch.policy import Policy

HAVE_AO = importlib.util.find_spec("torchao") is not None  # found, not imported (slow import)

@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """One intra-op thread: these layers are tiny, and on a shared 2-core machine a second
    thread mostly waits (wall time several times the CPU time)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EXPECTED = ["fp32", "bf16", "fp16", "bnb.int8", "bnb.nf4", "bnb.fp4", "torch.int8dyn",
            "rtn.int4", "rtn.int3", "rtn.int2", "ao.int8wo", "ao.int4wo", "ao.fp8"]
CPU_FORMATS = [f for f in EXPECTED if "cpu" in FORMATS[f].devices and (HAVE_AO or not f.startswith("ao."))]
FLOOR_DB = {"fp32": 200.0, "fp16": 64.0, "bf16": 47.0, "ao.int8wo": 45.0, "bnb.int8": 38.0,
            "torch.int8dyn": 30.0, "rtn.int4": 21.5, "bnb.nf4": 18.5, "bnb.fp4": 17.0,
            "rtn.int3": 15.0, "rtn.int2": 8.0}
SHAPES = [(256, 256), (100, 33), (512, 64)]  # (in, out); 100 is not a multiple of the groups


def _layer(in_f: int, out_f: int, bias: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def _x(in_f: int, dtype: torch.dtype = torch.float32, tokens: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, in_f, generator=g).to(dtype)


def sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref, y = ref.double(), y.double()
    noise = (ref - y).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.pow(2).sum() / noise))


@torch.no_grad()
def _sqnr(fmt: str, in_f: int, out_f: int) -> float:
    lin = _layer(in_f, out_f)
    x = _x(in_f)
    return sqnr_db(lin(x), get_format(fmt).make_module(lin)(x))


# -- registry ---------------------------------------------------------------------------------
def test_registry_has_the_contract_formats() -> None:
    assert list(FORMATS)[: len(EXPECTED)] == EXPECTED
    assert {n: FORMATS[n].bits for n in EXPECTED} == {
        "fp32": 32, "bf16": 16, "fp16": 16, "bnb.int8": 8, "bnb.nf4": 4, "bnb.fp4": 4, "torch.int8dyn": 8,
        "rtn.int4": 4, "rtn.int3": 3, "rtn.int2": 2, "ao.int8wo": 8, "ao.int4wo": 4, "ao.fp8": 8}
    assert FORMATS["torch.int8dyn"].devices == frozenset({"cpu"})
    assert FORMATS["ao.fp8"].devices == frozenset({"cuda"})


def test_unknown_format_lists_valid_names() -> None:
    with pytest.raises(MpsError, match=r"unknown format 'bnb.nf3' \(did you mean 'bnb.nf4'\?\); valid: fp32, bf16"):
        get_format("bnb.nf3")


def test_register_format_refuses_silent_override() -> None:
    with pytest.raises(MpsError, match="already registered"):
        register_format(CastFormat("fp32", 32, dtype=torch.float32))
    with pytest.raises(MpsError, match="expects a Format"):
        register_format("fp32")  # type: ignore[arg-type]


def test_available_formats_cpu() -> None:
    avail = available_formats("cpu")
    assert set(CPU_FORMATS) <= set(avail)
    assert "ao.fp8" not in avail and "ao.int4wo" not in avail


def test_check_device_errors() -> None:
    with pytest.raises(MpsError, match=r"format 'torch.int8dyn' cannot run on cuda \(it runs on: cpu\); formats for cuda: fp32"):
        get_format("torch.int8dyn").check_device("cuda:0")
    get_format("bnb.nf4").check_device("cuda")  # runs there (bitsandbytes >= 0.45 multi-backend)
    if not torch.cuda.is_available() and HAVE_AO:
        with pytest.raises(MpsError, match="ao.fp8.*compute capability >= 8.9; CUDA is not available"):
            get_format("ao.fp8").check_device("cuda")
    with pytest.raises(MpsError, match="unknown device"):
        get_format("fp32").check_device("tpu9")


def test_ao_formats_without_torchao_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    for name in ("ao.int8wo", "ao.int4wo", "ao.fp8"):
        dev = "cpu" if name == "ao.int8wo" else "cuda"
        with pytest.raises(MpsError, match=r"pip install 'mpsearch\[ao\]'"):
            get_format(name).check_device(dev)
    assert "ao.int8wo" not in available_formats("cpu")
    with pytest.raises(MpsError, match=r"pip install 'mpsearch\[ao\]'"):
        get_format("ao.int8wo").make_module(_layer(64, 8))


# -- numerics -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fmt", CPU_FORMATS)
def test_output_sqnr_above_floor(fmt: str, shape: tuple[int, int]) -> None:
    assert _sqnr(fmt, *shape) > FLOOR_DB[fmt]


def test_sqnr_ordering_by_precision() -> None:
    s = {f: _sqnr(f, 256, 256) for f in CPU_FORMATS}
    four = ["bnb.nf4", "bnb.fp4", "rtn.int4"]
    eight = ["bnb.int8", "torch.int8dyn"] + (["ao.int8wo"] if HAVE_AO else [])
    assert s["fp32"] == float("inf")
    assert s["fp32"] > s["fp16"] > s["bf16"] > max(s[f] for f in eight)
    assert min(s[f] for f in eight) > max(s[f] for f in four)
    assert min(s[f] for f in four) > s["rtn.int3"] > s["rtn.int2"]


@pytest.mark.parametrize("fmt", [f for f in CPU_FORMATS if FORMATS[f].weight_only])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@torch.no_grad()
def test_weight_only_module_equals_dequantized_matmul(fmt: str, dtype: torch.dtype) -> None:
    f = get_format(fmt)
    lin = _layer(100, 48, dtype=dtype)
    x = _x(100, dtype)
    y = f.make_module(lin)(x)
    cd = f.compute_dtype(dtype)
    w = f.quantize_weight(lin.weight)
    assert w.dtype == torch.float32 and w.shape == lin.weight.shape
    ref = nn.functional.linear(x.to(cd), w.to(cd), lin.bias.to(cd)).to(dtype)
    tol = 1e-5 if cd == torch.float32 else 1e-2
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("fmt", [f for f in CPU_FORMATS if not FORMATS[f].weight_only])
@torch.no_grad()
def test_activation_quantized_formats_stay_near_dequantized_matmul(fmt: str) -> None:
    lin = _layer(256, 64)
    x = _x(256)
    w = get_format(fmt).quantize_weight(lin.weight)
    assert 40 < sqnr_db(lin.weight, w) < 60  # an 8-bit weight: not the fp32 one, not garbage
    y = get_format(fmt).make_module(lin)(x)
    assert sqnr_db(nn.functional.linear(x, w, lin.bias), y) > 30  # only the activation rounding differs


@pytest.mark.parametrize("fmt", CPU_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@torch.no_grad()
def test_output_dtype_is_input_dtype(fmt: str, dtype: torch.dtype) -> None:
    lin = _layer(64, 32, dtype=dtype)
    m = get_format(fmt).make_module(lin)
    for x_dtype in {dtype, torch.float32}:
        y = m(_x(64, x_dtype, tokens=3).view(1, 3, 64))
        assert y.dtype == x_dtype and y.shape == (1, 3, 32) and torch.isfinite(y).all()
    assert m._mps_format == fmt and lin.weight.dtype == dtype  # the original is untouched


def test_make_module_leaves_original_untouched() -> None:
    lin = _layer(128, 64)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    for fmt in CPU_FORMATS:
        get_format(fmt).make_module(lin)
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())


# -- exact bytes ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", CPU_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@torch.no_grad()
def test_storage_bytes_equal_real_tensors(fmt: str, dtype: torch.dtype) -> None:
    f = get_format(fmt)
    for (in_f, out_f) in SHAPES:
        for bias in (True, False):
            m = f.make_module(_layer(in_f, out_f, bias=bias, dtype=dtype))
            assert module_bytes(m) == f.storage_bytes(in_f, out_f, bias, dtype), (in_f, out_f, bias)
            m(_x(in_f, dtype, tokens=2))  # bitsandbytes moves state on the first call: same bytes
            assert module_bytes(m) == f.storage_bytes(in_f, out_f, bias, dtype), (in_f, out_f, bias, "after forward")


@torch.no_grad()
def test_module_bytes_sees_bitsandbytes_hidden_state() -> None:
    """Independent sums of the tensors bitsandbytes keeps (not through module_bytes' walker)."""
    lin = _layer(256, 96)
    int8 = get_format("bnb.int8").make_module(lin).inner
    expect8 = int8.weight.nbytes + int8.weight.SCB.nbytes + int8.bias.nbytes
    assert expect8 == 256 * 96 + 4 * 96 + 4 * 96 == module_bytes(int8)
    int8(_x(256, tokens=2))  # SCB moves to int8.state
    assert int8.weight.SCB is None and int8.state.SCB is not None and module_bytes(int8) == expect8
    nf4 = get_format("bnb.nf4").make_module(lin).inner
    qs = nf4.weight.quant_state
    assert not qs.nested and qs.blocksize == 64 and qs.absmax.dtype == torch.float32
    expect4 = nf4.weight.nbytes + qs.absmax.nbytes + qs.code.nbytes + nf4.bias.nbytes
    assert expect4 == 256 * 96 // 2 + 4 * 256 * 96 // 64 + 64 + 4 * 96 == module_bytes(nf4)


def test_documented_bits_per_weight() -> None:
    assert get_format("bnb.nf4").bits_per_weight(4096, 4096) == pytest.approx(4 + 32 / 64, abs=1e-4)
    assert get_format("rtn.int2").bits_per_weight(4096, 4096) == pytest.approx(2 + 32 / 64)
    assert get_format("bf16").bits_per_weight(64, 64) == 16


# -- rtn internals ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_pack_unpack_round_trip(bits: int, n: int) -> None:
    codes = torch.randint(0, 2 ** bits, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == bits * -(-n // 8)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_error_within_half_step(bits: int) -> None:
    w = torch.randn(16, 100) * torch.logspace(-3, 1, 16).unsqueeze(1)  # rows of very different scale
    w[3] = 0.0  # a constant row: no NaN, exact zeros
    q = get_format(f"rtn.int{bits}").quantize_weight(w)
    assert torch.isfinite(q).all() and torch.equal(q[3], w[3])
    groups = [w[:, i:i + GROUP] for i in range(0, 100, GROUP)]
    qgroups = [q[:, i:i + GROUP] for i in range(0, 100, GROUP)]
    for g, qg in zip(groups, qgroups):
        step = (g.amax(1) - g.amin(1)) / (2 ** bits - 1)
        assert ((qg - g).abs() <= step.unsqueeze(1) * 0.5 * 1.01 + 1e-6).all()


# -- apply_policy -----------------------------------------------------------------------------
class Tiny(nn.Module):
    """Nested names, a bias-free layer, a non-Linear parameter and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 64)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"attn": nn.Linear(64, 64), "mlp": nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64, bias=False))})
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(64)
        self.register_buffer("pos", torch.randn(8, 64))
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, as in many language models

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        for b in self.blocks:
            h = h + b["attn"](h)
            h = h + b["mlp"](h)
        return self.head(self.norm(h))


LINEARS = ["blocks.0.attn", "blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.attn", "blocks.1.mlp.0", "blocks.1.mlp.2", "head"]
IDS = torch.tensor([[1, 5, 7, 9, 11, 2]])
MIXED = [
    Policy({"blocks.0.attn": "bnb.nf4", "blocks.1.mlp.0": "rtn.int2", "head": "bnb.int8"}, default="fp32"),
    Policy({"blocks.0.mlp.2": "torch.int8dyn"}, default="bf16", rules=[("blocks.1.*", "rtn.int3")]),
    Policy({}, default="bnb.fp4"),
    Policy({"head": "fp32"}, default="rtn.int4"),
]


def test_current_formats_lists_every_linear() -> None:
    assert current_formats(Tiny()) == {n: "fp32" for n in LINEARS}


@torch.no_grad()
def test_apply_policy_swaps_and_reports() -> None:
    model = Tiny().eval()
    ref_model = copy.deepcopy(model)
    policy = MIXED[0]
    report = apply_policy(model, policy)
    assert isinstance(report, AppliedReport) and report.policy_key == policy.key()
    assert [(c.name, c.old_format, c.new_format) for c in report.changes] == [
        ("blocks.0.attn", "fp32", "bnb.nf4"), ("blocks.1.mlp.0", "fp32", "rtn.int2"), ("head", "fp32", "bnb.int8")]
    assert sorted(report.unchanged) == sorted(set(LINEARS) - {"blocks.0.attn", "blocks.1.mlp.0", "head"})
    fmts = current_formats(model)
    assert fmts == {n: policy.format_for(n) for n in LINEARS}
    assert isinstance(model.blocks[0]["attn"], QuantizedLinear)
    assert type(model.blocks[0]["mlp"][0]) is nn.Linear  # unchanged layers are left as they are
    for c in report.changes:
        assert c.bytes_before == module_bytes(ref_model.get_submodule(c.name))
        assert c.bytes_after == module_bytes(model.get_submodule(c.name)) == get_format(c.new_format).storage_bytes(
            64, 128 if c.name.endswith("mlp.0") else (50 if c.name == "head" else 64), c.name != "head")
    assert report.bytes_before == sum(module_bytes(ref_model.get_submodule(n)) for n in LINEARS)
    assert report.bytes_after == sum(module_bytes(model.get_submodule(n)) for n in LINEARS)
    # each swapped layer computes what its format's module computes on the same input
    h = torch.randn(1, 6, 64)
    for c in report.changes:
        expect = get_format(c.new_format).make_module(ref_model.get_submodule(c.name))(h)
        assert torch.equal(model.get_submodule(c.name)(h), expect)
    out = model(IDS)
    assert torch.isfinite(out).all() and 5 < sqnr_db(ref_model(IDS), out) < 60
    text = str(report)
    assert "blocks.1.mlp.0" in text and "rtn.int2" in text and "3 layer(s) changed" in text
    assert report.to_dict()["changes"][0] == {"name": "blocks.0.attn", "old_format": "fp32", "new_format": "bnb.nf4",
                                              "bytes_before": 64 * 64 * 4 + 64 * 4,
                                              "bytes_after": 64 * 64 // 2 + 4 * 64 + 64 + 64 * 4}


def test_second_apply_same_policy_changes_nothing_and_requantizing_is_refused() -> None:
    model = Tiny()
    apply_policy(model, MIXED[0])
    again = apply_policy(model, MIXED[0])
    assert again.changes == [] and len(again.unchanged) == len(LINEARS)
    assert again.bytes_before == again.bytes_after
    before = dict(model.named_modules())
    with pytest.raises(MpsError, match=r"layer 'blocks.0.attn' is already bnb.nf4; re-quantizing .* to rtn.int4 is refused"):
        apply_policy(model, Policy({"blocks.0.attn": "rtn.int4"}, default="fp32"))
    assert dict(model.named_modules()) == before


@pytest.mark.parametrize("policy", MIXED, ids=lambda p: p.label)
def test_policy_memory_bytes_is_exact(policy: Policy) -> None:
    model = Tiny()
    predicted = policy_memory_bytes(model, policy)
    apply_policy(model, policy)
    assert predicted == module_bytes(model)
    assert policy_memory_bytes(model, policy) == predicted  # also exact on the applied model


def test_policy_memory_bytes_counts_tied_weights_once() -> None:
    model = Tiny()
    everything = {t.untyped_storage().data_ptr(): t.nbytes for t in list(model.parameters()) + list(model.buffers())}
    assert policy_memory_bytes(model, Policy({}, default="fp32")) == sum(everything.values()) == module_bytes(model)
    # head in nf4: the embedding keeps its fp32 table, the head adds its own 4-bit copy
    nf4_head = policy_memory_bytes(model, Policy({"head": "bnb.nf4"}, default="fp32"))
    assert nf4_head == sum(everything.values()) + get_format("bnb.nf4").storage_bytes(64, 50, False)


def test_bf16_model() -> None:
    model = Tiny().to(torch.bfloat16)
    policy = Policy({"blocks.0.attn": "bnb.nf4", "head": "fp32", "blocks.1.mlp.0": "torch.int8dyn"}, default="bf16")
    predicted = policy_memory_bytes(model, policy)
    report = apply_policy(model, policy)
    assert {c.name for c in report.changes} == {"blocks.0.attn", "head", "blocks.1.mlp.0"}
    assert predicted == module_bytes(model)
    out = model(IDS)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_unknown_layer_names_a_near_match() -> None:
    model = Tiny()
    with pytest.raises(MpsError, match=r"unknown layer 'blocks.0.atn' \(did you mean 'blocks.0.attn'\?\)"):
        apply_policy(model, Policy({"blocks.0.atn": "bnb.nf4"}, default="fp32"))
    with pytest.raises(MpsError, match="unknown layer 'norm'"):
        apply_policy(model, Policy({"norm": "bnb.nf4"}, default="fp32"))  # not a Linear
    with pytest.raises(MpsError, match="unknown layer 'nope'"):
        apply_policy(model, Policy({}, default="fp32"), layers=["nope"])
    assert current_formats(model) == {n: "fp32" for n in LINEARS}


def test_unknown_format_names_layer_and_valid_formats() -> None:
    model = Tiny()
    with pytest.raises(MpsError, match=r"layer 'head': unknown format 'int4'.*valid: fp32, bf16, fp16, bnb.int8"):
        apply_policy(model, Policy({"blocks.0.attn": "bnb.nf4", "head": "int4"}, default="fp32"))
    assert current_formats(model) == {n: "fp32" for n in LINEARS}  # nothing half-applied


def test_device_mismatch_raises_before_any_swap() -> None:
    cuda_only = register_format(CastFormat("test.cuda_only", 16, devices=frozenset({"cuda"}), dtype=torch.float16))
    try:
        model = Tiny()
        with pytest.raises(MpsError, match=r"layer 'head' -> test.cuda_only: format 'test.cuda_only' cannot run on cpu"):
            apply_policy(model, Policy({"blocks.0.attn": "bnb.nf4", "head": cuda_only.name}, default="fp32"))
        assert current_formats(model) == {n: "fp32" for n in LINEARS}
    finally:
        del FORMATS["test.cuda_only"]


def test_backend_failure_midway_rolls_back() -> None:
    class Flaky(CastFormat):
        def build(self, linear: nn.Linear) -> nn.Module:
            if linear.out_features == 50:
                raise RuntimeError("backend exploded")
            return super().build(linear)

    register_format(Flaky("test.flaky", 16, dtype=torch.bfloat16))
    try:
        model = Tiny()
        modules = dict(model.named_modules())
        with pytest.raises(MpsError, match="layer 'head' -> test.flaky: RuntimeError: backend exploded"):
            apply_policy(model, Policy({}, default="test.flaky"))
        assert dict(model.named_modules()) == modules
    finally:
        del FORMATS["test.flaky"]


def test_layers_argument_limits_the_universe() -> None:
    model = Tiny()
    report = apply_policy(model, Policy({}, default="rtn.int4"), layers=["blocks.0.attn", "head"])
    assert [c.name for c in report.changes] == ["blocks.0.attn", "head"]
    assert current_formats(model)["blocks.1.attn"] == "fp32"
    with pytest.raises(MpsError, match="unknown layer 'blocks.1.attn'"):
        apply_policy(Tiny(), Policy({"blocks.1.attn": "bf16"}, default="fp32"), layers=["head"])


# -- ModuleBank -------------------------------------------------------------------------------
@torch.no_grad()
def test_module_bank_matches_apply_policy_and_restores() -> None:
    model = Tiny().eval()
    ref = model(IDS)
    bank = ModuleBank(model, None, ["bnb.nf4", "rtn.int2", "bnb.int8", "torch.int8dyn", "bf16", "rtn.int3", "rtn.int4", "bnb.fp4"])
    for policy in MIXED:
        report = bank.apply(policy)
        assert current_formats(model) == {n: policy.format_for(n) for n in LINEARS}
        twin = copy.deepcopy(Tiny().eval())
        apply_policy(twin, policy)
        assert torch.equal(model(IDS), twin(IDS)), policy.label
        assert report.bytes_after == sum(module_bytes(model.get_submodule(n)) for n in LINEARS)
        assert module_bytes(model) == policy_memory_bytes(Tiny(), policy)
    bank.restore()
    assert current_formats(model) == {n: "fp32" for n in LINEARS}
    assert torch.equal(model(IDS), ref)


def test_module_bank_builds_once_and_reports_changes() -> None:
    model = Tiny()
    bank = ModuleBank(model, LINEARS[:2], ["rtn.int4", "bnb.nf4"])
    first = bank.apply(Policy({}, default="rtn.int4"))
    assert [(c.name, c.old_format, c.new_format) for c in first.changes] == [(n, "fp32", "rtn.int4") for n in LINEARS[:2]]
    built = model.blocks[0]["attn"]
    bank.apply(Policy({LINEARS[0]: "bnb.nf4"}, default="rtn.int4"))
    back = bank.apply(Policy({}, default="rtn.int4"))
    assert [c.name for c in back.changes] == [LINEARS[0]] and model.blocks[0]["attn"] is built  # cached, not rebuilt
    assert bank.cached_bytes() == sum(module_bytes(bank.module(n, f)) for n, f in
                                      [(LINEARS[0], "rtn.int4"), (LINEARS[1], "rtn.int4"), (LINEARS[0], "bnb.nf4")])
    with pytest.raises(MpsError, match=r"format 'bnb.int8' is not in this ModuleBank; its formats: rtn.int4, bnb.nf4"):
        bank.apply(Policy({LINEARS[1]: "bnb.int8"}, default="rtn.int4"))
    assert current_formats(model)[LINEARS[1]] == "rtn.int4"
    with pytest.raises(MpsError, match="ModuleBank needs the unquantized model"):
        ModuleBank(model, None, ["bf16"])


# -- a real transformers model -----------------------------------------------------------------
def _tiny_vlm() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """tiny:llava from mpsearch.models with one image and a prompt (its own processor)."""
    from PIL import Image

    from mpsearch.models import load_vlm

    model, processor = load_vlm("tiny:llava")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (64, 64), (200, 30, 30)), text=text, return_tensors="pt")
    return model.eval(), dict(inputs)


@torch.no_grad()
def test_transformers_vlm_mixed_policy() -> None:
    model, inputs = _tiny_vlm()
    ref = model(**inputs).logits
    from mpsearch.models import discover_layers

    names = [layer.name for layer in discover_layers(model)]
    assert list(current_formats(model)) == names  # the same universe as layer discovery
    policy = Policy({names[0]: "bnb.nf4", names[1]: "torch.int8dyn", names[-1]: "bnb.int8"}, default="fp32",
                    rules=[("*vision_tower*mlp*", "rtn.int2"), ("*language_model*", "rtn.int4")])
    predicted, full = policy_memory_bytes(model, policy), module_bytes(model)
    report = apply_policy(model, policy)
    expected = {n: policy.format_for(n) for n in names if policy.format_for(n) != "fp32"}
    assert {c.name: c.new_format for c in report.changes} == expected and len(expected) > 10
    assert current_formats(model) == {n: policy.format_for(n) for n in names}
    assert module_bytes(model) == predicted < full
    out = model(**inputs).logits
    assert out.shape == ref.shape and torch.isfinite(out).all() and 0 < sqnr_db(ref, out) < 60


def test_multihead_attention_children_are_not_layers() -> None:
    model = nn.Sequential(nn.Linear(16, 16))
    model.add_module("mha", nn.MultiheadAttention(16, 2))  # reads out_proj.weight directly: not swappable
    assert list(current_formats(model)) == ["0"]
    apply_policy(model, Policy({}, default="rtn.int4"))
    assert type(model.mha.out_proj) is not QuantizedLinear


# -- optional: torchao on GPU ------------------------------------------------------------------
@pytest.mark.skipif(not (HAVE_AO and torch.cuda.is_available()), reason="needs torchao and a CUDA GPU")
@pytest.mark.parametrize("fmt", ["ao.int8wo", "ao.int4wo", "ao.fp8", "bnb.nf4", "bnb.int8", "rtn.int4"])
@torch.no_grad()
def test_cuda_formats_bytes_and_sqnr(fmt: str) -> None:
    f = get_format(fmt)
    try:
        f.check_device("cuda")
    except MpsError as exc:
        pytest.skip(str(exc))
    lin = _layer(1024, 256, dtype=torch.bfloat16).cuda()
    x = _x(1024, torch.bfloat16).cuda()
    m = f.make_module(lin)
    assert module_bytes(m) == f.storage_bytes(1024, 256, True, torch.bfloat16)
    assert sqnr_db(lin(x).float(), m(x).float()) > {"ao.int8wo": 35, "ao.fp8": 25, "bnb.int8": 35}.get(fmt, 15)


def test_memory_of_many_dynamic_int8_layers_is_not_undercounted():
    # torch's dynamic int8 hands out freshly unpacked weights; their ids and addresses must not
    # be reused while storages are compared (regression: 55 layers counted as ~0.4 of their bytes)
    from mpsearch.formats import apply_policy, get_format, policy_memory_bytes
    from mpsearch.formats.base import module_bytes
    from mpsearch.policy import Policy

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(24)])
    fmt = get_format("torch.int8dyn")
    expected = 24 * fmt.storage_bytes(128, 128, True)
    policy = Policy({}, default="torch.int8dyn")
    assert policy_memory_bytes(model, policy) == expected
    apply_policy(model, policy)
    assert module_bytes(model) == expected
    assert policy_memory_bytes(model, policy) == expected
