"""Latency: workload/token arithmetic, table arithmetic and JSON, caching, dedup, mismatch errors.

No assertion here depends on how fast anything runs (machines are noisy): timings are either
counted, replaced by deterministic stand-ins, or checked for structure (zero where a part of
the model does not run, sums where the table combines phases).
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from mpsearch.errors import ArtifactError, MpsError
from mpsearch.latency import (
    LatencyTable,
    PhaseRunner,
    Timing,
    Workload,
    dummy_inputs,
    fit_correction,
    measure_latency_table,
    measure_model_latency,
    random_policies,
    roofline_ms,
    token_counts,
    uniform_policies,
)
from mpsearch.latency import cache as cache_mod
from mpsearch.latency import context as context_mod
from mpsearch.latency import isolated as isolated_mod
from mpsearch.latency import measure as measure_mod
from mpsearch.latency import table as table_mod
from mpsearch.latency.roofline import bandwidth_bytes_per_s
from mpsearch.latency.timing import fixed_threads, iqr, time_callable
from mpsearch.latency.validate import loo_errors
from mpsearch.policy import Policy
from mpsearch.space import SearchSpace

FAST = dict(repeats=2, warmup=0, threads=1)
INT8 = "torch.int8dyn"


def _space(*fmts: str) -> SearchSpace:
    fmts = list(fmts) or ["fp32", INT8]
    return SearchSpace("test", {g: list(fmts) for g in ("vision", "projector", "language", "head")})


@pytest.fixture(scope="module")
def llava():
    from mpsearch.models import discover_layers, load_vlm

    model, processor = load_vlm("tiny:llava")
    return model, processor, discover_layers(model)


def _observed_rows(model, inputs, names):
    rows = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: rows.setdefault(n, []).append(a[0].numel() // a[0].shape[-1])) for n in names]
    try:
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return rows


# -- Workload ---------------------------------------------------------------------------------
def test_workload_parse_and_roundtrip():
    w = Workload.parse("batch=2,phase=both,new_tokens=8,image_size=336,threads=1,compile=false")
    assert (w.batch, w.phase, w.new_tokens, w.image_size, w.threads, w.compile) == (2, "both", 8, 336, 1, False)
    assert Workload.from_dict(json.loads(json.dumps(w.to_dict()))) == w
    assert Workload.parse("compile=reduce-overhead").compile == "reduce-overhead"
    assert Workload.parse("") == Workload()


@pytest.mark.parametrize("text, field", [("batch=0", "batch"), ("phase=train", "phase"), ("colour=red", "colour"),
                                         ("batch", "batch"), ("phase=both", "new_tokens"), ("stat=mean", "stat"),
                                         ("image_size=big", "image_size")])
def test_workload_rejects_bad_fields(text, field):
    with pytest.raises(MpsError, match=field):
        Workload.parse(text)


# -- token counts -----------------------------------------------------------------------------
def test_token_counts_llava_15_config_arithmetic():
    from transformers import LlavaConfig

    cfg = LlavaConfig()  # llava-1.5: CLIP ViT-L/14 at 336 px, "default" strategy drops CLS
    tc = token_counts(cfg, Workload(batch=2, prompt_tokens=40))
    assert tc.vision_seq == (336 // 14) ** 2 + 1 == 577
    assert tc.image_tokens == 576 == cfg.image_seq_length
    assert tc.seq_len == 616
    assert tc.per_group == {"vision": 2 * 577, "projector": 2 * 576, "language": 2 * 616, "head": 2}
    full = copy.deepcopy(cfg)
    full.vision_feature_select_strategy = "full"
    assert token_counts(full, Workload()).image_tokens == 577
    dec = token_counts(cfg, Workload(batch=3, phase="decode"))
    assert dec.per_group == {"vision": 0, "projector": 0, "language": 3, "head": 3}
    assert token_counts(cfg, Workload(image_size=224)).image_tokens == 256


def test_token_counts_qwen2_vl_merge_and_unknown_arch():
    from transformers import Qwen2VLConfig

    tc = token_counts(Qwen2VLConfig(), Workload(image_size=448, prompt_tokens=10))
    assert tc.vision_seq == 32 * 32 and tc.image_tokens == 16 * 16 and tc.seq_len == 266
    with pytest.raises(MpsError, match="image_size"):
        token_counts(Qwen2VLConfig(), Workload())
    from transformers import LlamaConfig

    with pytest.raises(MpsError, match="inputs=.*processor="):
        token_counts(LlamaConfig(), Workload())


@pytest.mark.parametrize("arch", ["llava", "internvl", "qwen2_vl", "idefics3"])
def test_derived_tokens_match_what_the_model_sees(arch):
    from mpsearch.models import discover_layers, load_vlm

    model, _ = load_vlm(f"tiny:{arch}")
    w = Workload(batch=2, prompt_tokens=7, image_size=56 if arch == "qwen2_vl" else None)
    tc = token_counts(model, w)
    layers = discover_layers(model)
    inputs = dummy_inputs(model, w)
    assert inputs["input_ids"].shape == (2, tc.seq_len)
    rows = _observed_rows(model, inputs, [x.name for x in layers])
    for x in layers:
        assert rows[x.name] == [tc.per_group[x.group]], (x.name, x.group)
    # one decode step per row on the prompt's KV cache, cache cropped back after it
    runner = PhaseRunner(model, w.with_(phase="decode"), "decode")
    n = runner._cache.get_seq_length()
    assert n == tc.seq_len
    with torch.inference_mode():
        out = runner.run()
        runner.reset()
    assert out.logits.shape[:2] == (2, 1) and runner._cache.get_seq_length() == n


def test_demo_model_config_token_counts():
    from pathlib import Path

    from transformers import AutoConfig

    demo = Path(__file__).resolve().parents[1] / "mpsearch" / "demo"
    assert (demo / "config.json").is_file(), "the demo model must ship with the package"
    cfg = AutoConfig.from_pretrained(str(demo))
    v = cfg.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    tc = token_counts(cfg, Workload(prompt_tokens=33))
    assert tc.vision_seq == patches + 1
    assert tc.image_tokens == (patches if cfg.vision_feature_select_strategy == "default" else patches + 1)
    assert tc.seq_len == tc.image_tokens + 33
    from mpsearch.models import discover_layers, load_vlm

    model, _ = load_vlm("demo")
    layers = discover_layers(model)
    rows = _observed_rows(model, dummy_inputs(model, Workload(prompt_tokens=33)), [x.name for x in layers])
    for x in layers:
        assert rows[x.name] == [tc.per_group[x.group]], (x.name, x.group)


def test_unsupported_arch_needs_inputs_or_processor():
    from mpsearch.models import load_vlm

    model, processor = load_vlm("tiny:llava_next")
    with pytest.raises(MpsError, match="llava_next"):
        measure_model_latency(model, None, Workload(**FAST))
    t = measure_model_latency(model, None, Workload(processor=processor, **FAST))
    assert len(t.samples_ms) == 2 and t.median_ms > 0


# -- the table's arithmetic and JSON ----------------------------------------------------------
def _hand_table() -> LatencyTable:
    return LatencyTable(base_ms=10.0, ms={
        "v.fc1": {"fp32": 1.0, INT8: 0.25, "bnb.nf4": 4.0},
        "l.q": {"fp32": 2.0, INT8: 0.5},
        "head": {"fp32": 3.0},
    }, meta={"device": "cpu: test"})


def test_predict_is_base_plus_chosen_entries():
    t = _hand_table()
    assert t.predict(Policy({}, default="fp32")) == 16.0
    assert t.predict(Policy({"v.fc1": INT8, "l.q": INT8}, default="fp32")) == 10.0 + 0.25 + 0.5 + 3.0
    assert t.predict(Policy({"v.fc1": "bnb.nf4"}, default="fp32", rules=[("l.*", INT8)])) == 10 + 4 + 0.5 + 3
    assert t.uniform_ms(INT8, fallback="fp32") == 13.75
    with pytest.raises(MpsError, match="'head'.*torch.int8dyn"):
        t.predict(Policy({}, default=INT8))
    with pytest.raises(MpsError, match="not.*have|does not have"):
        t.predict(Policy({"vision.other": "fp32"}, default="fp32"))
    assert t.formats() == ["fp32", INT8, "bnb.nf4"]
    assert t.device == "cpu: test"


def test_table_rejects_bad_values():
    with pytest.raises(MpsError, match="base_ms"):
        LatencyTable(float("nan"), {})
    with pytest.raises(MpsError, match=r"ms\['a'\]\['fp32'\]"):
        LatencyTable(1.0, {"a": {"fp32": "fast"}})


def test_json_roundtrip(tmp_path):
    t = _hand_table()
    path = tmp_path / "lat.json"
    t.to_json(path)
    obj = json.loads(path.read_text())
    assert obj["schema"] == 1 and obj["kind"] == "latency"
    assert obj["provenance"]["device"] == "cpu: test" and "torch" in obj["provenance"]
    back = LatencyTable.from_json(path)
    assert back.base_ms == t.base_ms and back.ms == t.ms and back.device == t.device
    pol = Policy({"v.fc1": INT8}, default="fp32")
    assert back.predict(pol) == t.predict(pol)
    obj["kind"] = "sensitivity"
    path.write_text(json.dumps(obj))
    with pytest.raises(ArtifactError, match="kind"):
        LatencyTable.from_json(path)
    obj["kind"] = "latency"
    obj["ms"]["l.q"]["fp32"] = None
    path.write_text(json.dumps(obj))
    with pytest.raises(ArtifactError, match="l.q"):
        LatencyTable.from_json(path)


# -- measuring on the tiny model (structure, never speed) --------------------------------------
def test_context_table_covers_candidates_and_restores_model(llava):
    from mpsearch.formats import current_formats

    model, _, layers = llava
    space = SearchSpace("s", {"vision": ["fp32", INT8], "projector": ["fp32"], "language": ["fp32", INT8, "rtn.int4"],
                              "head": ["fp32"]}, pin={"*lm_head": "fp32"})
    before = current_formats(model)
    t = measure_latency_table(model, layers, space, Workload(**FAST), progress=False, log=lambda m: None)
    assert current_formats(model) == before
    for x in layers:
        assert sorted(t.ms[x.name]) == sorted(space.candidates(x))
        assert all(v >= 0 and math.isfinite(v) for v in t.ms[x.name].values())
    # layers sharing (in, out, bias, rows, format) share one figure
    by_key = {}
    for x in layers:
        for f, v in t.ms[x.name].items():
            by_key.setdefault((x.in_features, x.out_features, x.bias, x.group, f), set()).add(v)
    assert all(len(vs) == 1 for vs in by_key.values())
    # predict(reference) is the measured full-precision model: base + its layers' times
    ref = t.base_ms + sum(t.ms[x.name]["fp32"] for x in layers)
    assert t.predict(Policy({}, default="fp32")) == pytest.approx(ref)
    assert t.meta["method"] == "context" and t.meta["threads"] == 1


def test_decode_table_gives_vision_zero(llava):
    model, _, layers = llava
    t = measure_latency_table(model, layers, _space(), Workload(phase="decode", **FAST), progress=False,
                              log=lambda m: None)
    for x in layers:
        if x.group in ("vision", "projector"):
            assert t.ms[x.name] == {"fp32": 0.0, INT8: 0.0}
        else:
            assert t.ms[x.name]["fp32"] > 0
    assert t.meta["rows_observed"]["decode"]["language"] == [[1]]


def test_decode_runner_keeps_the_cache_at_prompt_length(llava):
    model, _, _ = llava
    w = Workload(batch=2, phase="decode", **FAST)
    runner = PhaseRunner(model, w, "decode")
    n = runner._cache.get_seq_length()
    assert n == token_counts(model, w).seq_len
    with torch.inference_mode():
        for _ in range(3):
            out = runner.run()
            assert runner._cache.get_seq_length() == n + 1
            runner.reset()
            assert runner._cache.get_seq_length() == n
    assert out.logits.shape[:2] == (2, 1)


def _double_depth(model):
    cfg = copy.deepcopy(model.config)
    cfg.text_config.num_hidden_layers *= 2
    cfg.vision_config.num_hidden_layers *= 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return type(model)(cfg).eval()


def test_isolated_method_times_each_unique_key_once(llava, monkeypatch):
    from mpsearch.models import discover_layers

    model, _, layers = llava
    big = _double_depth(model)
    big_layers = discover_layers(big)
    assert len(big_layers) > len(layers) + 8
    calls = []

    def fake_time_unique(key, dtype, device, workload):
        calls.append(key)
        in_f, out_f, _bias, rows, fmt = key
        return sum(rows) * in_f * out_f * (0.5 if fmt == INT8 else 1.0) * 1e-6

    monkeypatch.setattr(isolated_mod, "time_unique", fake_time_unique)
    counts = []
    for m, ls in ((model, layers), (big, big_layers)):
        calls.clear()
        t = measure_latency_table(m, ls, _space(), Workload(**FAST), method="isolated", progress=False,
                                  log=lambda msg: None)
        assert len(calls) == len(set(calls))  # never the same key twice
        counts.append(len(calls))
        for x in ls:  # every layer's entry is its key's (stand-in) timing
            rows = t.meta["rows_observed"]["prefill"][x.group][0]
            for f in ("fp32", INT8):
                assert t.ms[x.name][f] == pytest.approx(fake_time_unique(
                    (x.in_features, x.out_features, x.bias, tuple(rows), f), None, None, None))
    assert counts[0] == counts[1]


def test_context_method_forward_count_does_not_grow_with_depth(llava):
    from mpsearch.models import discover_layers

    model, _, layers = llava
    big = _double_depth(model)
    metas = []
    for m, ls in ((model, layers), (big, discover_layers(big))):
        t = measure_latency_table(m, ls, _space(), Workload(**FAST), progress=False, log=lambda msg: None)
        metas.append(t.meta)
    assert metas[0]["unique_keys"] == metas[1]["unique_keys"]
    assert metas[0]["forward_passes"] == metas[1]["forward_passes"]


def test_phase_both_is_prefill_plus_n_decode(llava, monkeypatch):
    model, _, layers = llava

    def fake_time_unique(key, dtype, device, workload):
        in_f, out_f, _bias, rows, fmt = key
        return sum(rows) * (in_f + out_f) * (0.5 if fmt == INT8 else 1.0) * 1e-4

    def fake_time(self, repeats, warmup):
        return Timing.from_samples([100.0 if self.phase == "prefill" else 7.0])

    monkeypatch.setattr(isolated_mod, "time_unique", fake_time_unique)
    monkeypatch.setattr(PhaseRunner, "time", fake_time)
    kw = dict(method="isolated", progress=False, log=lambda m: None)
    pre = measure_latency_table(model, layers, _space(), Workload(**FAST), **kw)
    dec = measure_latency_table(model, layers, _space(), Workload(phase="decode", **FAST), **kw)
    both = measure_latency_table(model, layers, _space(), Workload(phase="both", new_tokens=5, **FAST), **kw)
    assert both.base_ms == pytest.approx(pre.base_ms + 5 * dec.base_ms)
    for x in layers:
        for f in ("fp32", INT8):
            assert both.ms[x.name][f] == pytest.approx(pre.ms[x.name][f] + 5 * dec.ms[x.name][f])
    # the base is the end-to-end time minus the reference layers' times, exactly
    assert pre.base_ms == pytest.approx(100.0 - sum(pre.ms[x.name]["fp32"] for x in layers))


def test_compile_with_context_method_is_refused(llava):
    model, _, layers = llava
    with pytest.raises(MpsError, match="isolated"):
        measure_latency_table(model, layers, _space(), Workload(compile=True, **FAST), method="context")


def test_table_needs_the_full_precision_model(llava):
    from mpsearch.formats import apply_policy

    model, _, layers = llava
    m = copy.deepcopy(model)
    apply_policy(m, Policy({layers[0].name: INT8}, default="fp32"))
    with pytest.raises(MpsError, match="full-precision"):
        measure_latency_table(m, layers, _space(), Workload(**FAST))


# -- cache ------------------------------------------------------------------------------------
def test_cache_reused_only_for_the_same_key(llava, tmp_path, monkeypatch):
    model, _, layers = llava
    msgs: list[str] = []
    kw = dict(cache_dir=str(tmp_path), progress=False, log=msgs.append)
    first = measure_latency_table(model, layers, _space(), Workload(**FAST), **kw)
    assert len(list(tmp_path.glob("latency-*.json"))) == 1

    def boom(*a, **k):
        raise AssertionError("measured although a fitting cache exists")

    with monkeypatch.context() as mp:
        mp.setattr(measure_mod, "measure_context", boom)
        again = measure_latency_table(model, layers, _space(), Workload(**FAST), **kw)
    assert again.ms == first.ms and any("using" in m for m in msgs)

    # another device: the cached table is named, refused, and a new one measured
    msgs.clear()
    with monkeypatch.context() as mp:
        mp.setattr(cache_mod, "current_device_name", lambda m: "NVIDIA H100 80GB HBM3")
        other = measure_latency_table(model, layers, _space(), Workload(**FAST), **kw)
    assert other.device == "NVIDIA H100 80GB HBM3"
    assert any("another setting" in m and "device" in m and "H100" in m for m in msgs), msgs
    # another workload
    msgs.clear()
    measure_latency_table(model, layers, _space(), Workload(batch=2, **FAST), **kw)
    assert any("another setting" in m and "workload" in m for m in msgs), msgs
    # another library version
    msgs.clear()
    with monkeypatch.context() as mp:
        mp.setattr(cache_mod, "library_key", lambda: {**table_mod.library_key(), "torch": "9.9.9"})
        measure_latency_table(model, layers, _space(), Workload(**FAST), **kw)
    assert any("versions" in m and "9.9.9" in m for m in msgs), msgs
    # a tampered file under the right name is refused too
    msgs.clear()
    key = first.meta["cache_key"]
    path = table_mod.cache_path(tmp_path, key)
    obj = json.loads(path.read_text())
    obj["meta"]["cache_key"]["device"] = "cpu: elsewhere"
    path.write_text(json.dumps(obj))
    measure_latency_table(model, layers, _space(), Workload(**FAST), **kw)
    assert any("does not fit" in m and "elsewhere" in m for m in msgs), msgs


def test_require_refuses_a_table_for_another_device_or_workload(tmp_path):
    key = {"device": "cpu: A", "workload": Workload(batch=1).timing_key()}
    t = LatencyTable(1.0, {"x": {"fp32": 1.0}}, meta={"device": "cpu: A", "cache_key": key})
    t.to_json(tmp_path / "t.json")
    back = LatencyTable.from_json(tmp_path / "t.json")
    back.require(device="cpu: A", workload=Workload(batch=1).timing_key())
    with pytest.raises(ArtifactError, match="device.*cpu: A.*cpu: B"):
        back.require(device="cpu: B")
    with pytest.raises(ArtifactError, match="workload"):
        back.require(workload=Workload(batch=4).timing_key())


# -- end-to-end timing ------------------------------------------------------------------------
def test_measure_model_latency_refuses_a_mismatched_policy(llava):
    from mpsearch.formats import apply_policy

    model, _, layers = llava
    m = copy.deepcopy(model)
    name = layers[3].name
    policy = Policy({name: INT8}, default="fp32")
    with pytest.raises(MpsError, match=f"{name}.*fp32.*{INT8}"):
        measure_model_latency(m, policy, Workload(**FAST))
    apply_policy(m, policy)
    t = measure_model_latency(m, policy, Workload(**FAST))
    assert len(t.samples_ms) == 2 and float(t) == t.median_ms > 0 and t.threads == 1
    with pytest.raises(MpsError, match="fp32"):
        measure_model_latency(m, Policy({}, default="fp32"), Workload(**FAST))
    both = measure_model_latency(m, None, Workload(phase="both", new_tokens=3, **FAST))
    assert len(both.samples_ms) == 2


def test_measure_policies_and_validation_rows(llava):
    from mpsearch.latency import validate_table

    model, _, layers = llava
    space = _space()
    table = measure_latency_table(model, layers, space, Workload(**FAST), progress=False, log=lambda m: None)
    report = validate_table(table, model, layers, space, Workload(**FAST), k=3, seed=1)
    assert [r.label for r in report.rows] == ["uniform fp32", f"uniform {INT8}", "random 0", "random 1", "random 2"]
    for r in report.rows:
        assert r.predicted_ms == pytest.approx(table.predict(r.policy))
        assert r.error == pytest.approx(r.predicted_ms / r.measured_ms - 1)
    assert report.worst_error >= report.median_error >= 0
    assert len(report.lines()) == 1 + len(report.rows)


# -- policies, correction, timers, roofline ---------------------------------------------------
def test_random_and_uniform_policies_respect_ties_and_pins(llava):
    _, _, layers = llava
    space = SearchSpace("s", {"vision": ["fp32", INT8], "projector": ["fp32"], "language": ["fp32", INT8, "bnb.nf4"],
                              "head": ["fp32", INT8]}, pin={"*lm_head": "fp32"}, tie=[["q_proj", "k_proj", "v_proj"]])
    pols = random_policies(space, layers, 5, seed=3)
    assert pols[0].formats == random_policies(space, layers, 5, seed=3)[0].formats
    for p in pols:
        assert p.format_for("lm_head") == "fp32"
        for x in layers:
            assert p.format_for(x.name) in space.candidates(x)
        for d in space.decisions(layers):
            assert len({p.format_for(n) for n in d.layers}) == 1
    uni = {p.meta["label"]: p for p in uniform_policies(space, layers)}
    assert set(uni) == {"uniform fp32", f"uniform {INT8}", "uniform bnb.nf4"}
    nf4 = uni["uniform bnb.nf4"]
    for x in layers:
        want = "bnb.nf4" if x.group == "language" else "fp32"
        assert nf4.format_for(x.name) == want


def test_fit_correction_recovers_known_offset_and_scales():
    t = LatencyTable(10.0, {"v.fc1": {"fp32": 1.0, INT8: 0.3, "bnb.nf4": 4.0}, "l.q": {"fp32": 2.0, INT8: 0.5},
                            "head": {"fp32": 3.0, INT8: 0.7}})
    layers = list(t.ms)
    import random as _r

    rng = _r.Random(0)
    pols = []
    for _ in range(12):
        mapping = {"v.fc1": rng.choice(["fp32", INT8, "bnb.nf4"]), "l.q": rng.choice(["fp32", INT8]),
                   "head": rng.choice(["fp32", INT8])}
        pols.append(Policy(mapping, default="fp32"))
    truth = {"fp32": 1.2, INT8: 0.8, "bnb.nf4": 1.5}

    def measured(p):
        return 7.0 + sum(truth[p.format_for(n)] * t.ms[n][p.format_for(n)] for n in layers)

    pairs = [(p, measured(p)) for p in pols]
    corr = fit_correction(t, pairs)
    assert corr.base_ms == pytest.approx(7.0, abs=1e-6)
    for f, s in truth.items():
        assert corr.scale[f] == pytest.approx(s, abs=1e-6)
    fixed = corr.apply(t)
    for p, m in pairs:
        assert fixed.predict(p) == pytest.approx(m, rel=1e-9)
    assert max(abs(e) for e in loo_errors(t, pairs)) < 1e-6
    assert fixed.meta["correction"]["scale"][INT8] == pytest.approx(0.8)
    with pytest.raises(MpsError, match="more than"):
        fit_correction(t, pairs[:3])


def test_timing_statistics_and_timer():
    t = Timing.from_samples([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.min_ms, t.spread_ms, float(t)) == (3.0, 1.0, 2.0, 3.0)
    assert iqr([1.0]) == 0.0
    calls = []
    tt = time_callable(lambda: calls.append(1), repeats=4, warmup=2, reset=lambda: calls.append(0))
    assert calls == [1, 0] * 6 and len(tt.samples_ms) == 4


def test_fixed_threads_restores():
    before = torch.get_num_threads()
    with fixed_threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_roofline_arithmetic():
    assert roofline_ms(3.35e9, "NVIDIA H100 80GB HBM3") == pytest.approx(1.0)
    assert roofline_ms(4.8e9, "NVIDIA H200") == pytest.approx(1.0)
    assert roofline_ms(2.0e9, "NVIDIA A100-SXM4-80GB") == pytest.approx(1.0)
    assert roofline_ms(1.555e9, "NVIDIA A100-PCIE-40GB") == pytest.approx(1.0)
    assert roofline_ms(0.3e9, "NVIDIA L4") == pytest.approx(1.0)
    assert roofline_ms(1.008e9, "NVIDIA GeForce RTX 4090") == pytest.approx(1.0)
    assert roofline_ms(2.0e9, "NVIDIA H100 PCIe") == pytest.approx(1.0)
    assert bandwidth_bytes_per_s("NVIDIA L40S") is None
    with pytest.raises(MpsError, match="bandwidth"):
        roofline_ms(1e9, "cpu: Intel(R) Xeon(R)")
    assert roofline_ms(1e9, "cpu", bandwidth=1e11) == pytest.approx(10.0)


def test_overhead_fit_recovers_base_and_per_format_overheads():
    names = ["a", "b", "c", "d"]
    runs = {"a": True, "b": True, "c": True, "d": False}  # d does not run in this phase
    passes = [("reference", dict.fromkeys(names, "fp32")),
              ("uniform int8", dict.fromkeys(names, INT8)),
              ("uniform nf4", dict.fromkeys(names, "bnb.nf4")),
              ("mixed 0", {"a": INT8, "b": "bnb.nf4", "c": "fp32", "d": INT8}),
              ("mixed 1", {"a": "fp32", "b": INT8, "c": INT8, "d": "bnb.nf4"})]
    truth = {INT8: 0.125, "bnb.nf4": -0.05}
    rest = [2.0 + sum(truth.get(f, 0.0) for n, f in m.items() if runs[n]) for _, m in passes]
    base, overhead, resid = context_mod.fit_overheads(passes, rest, runs, {"fp32"})
    assert base == pytest.approx(2.0)
    assert overhead == pytest.approx(truth)
    assert max(abs(r) for r in resid) < 1e-9


def test_cpu_clock_needs_one_thread():
    with pytest.raises(MpsError, match="threads=1"):
        Workload(clock="cpu")
    with pytest.raises(MpsError, match="clock"):
        Workload(clock="tsc", threads=1)
    t = time_callable(lambda: sum(range(20000)), repeats=3, warmup=0, clock="cpu")
    assert len(t.samples_ms) == 3 and t.min_ms >= 0


# -- CLI ----------------------------------------------------------------------------------------
def test_cli_latency_writes_a_table_and_validates(tmp_path, capsys):
    from mpsearch import cli

    space = tmp_path / "s.yaml"
    space.write_text("name: s\ngroups: {vision: [fp32, torch.int8dyn], projector: [fp32], "
                     "language: [fp32, torch.int8dyn], head: [fp32]}\n")
    out = tmp_path / "lat.json"
    rep = tmp_path / "val.json"
    code = cli.main(["latency", "tiny:llava", "--space", str(space), "--workload", "threads=1,repeats=2,warmup=0",
                     "--validate", "4", "--no-progress", "-o", str(out), "--report", str(rep)])
    assert code == 0
    text = capsys.readouterr().out
    assert "uniform torch.int8dyn" in text and "median |error|" in text and "random 3" in text
    t = LatencyTable.from_json(out)
    assert t.meta["validation"]["worst_error"] >= t.meta["validation"]["median_error"]
    assert json.loads(rep.read_text())["kind"] == "latency-validation"


@pytest.mark.parametrize("argv, msg", [
    (["--workload", "phase=sideways"], "phase"),
    (["--workload", "threads=1", "--correct", "always"], "--validate"),
])
def test_cli_latency_bad_input_exits_2(argv, msg, capsys):
    from mpsearch import cli

    code = cli.main(["latency", "tiny:llava", "--space", "cpu", "--no-progress", *argv])
    assert code == 2
    assert msg in capsys.readouterr().err


# -- attribution with a known clock, compilation, threads ---------------------------------------
class _VirtualClock:
    """Time that moves only when the test charges it (ms); ``now()`` in seconds like perf_counter."""

    def __init__(self) -> None:
        self.t_ms = 0.0

    def now(self) -> float:
        return self.t_ms / 1e3


def test_context_attribution_with_an_injected_clock(llava, monkeypatch):
    """Every Linear call costs a known time inside the call, every int8 layer a known overhead outside
    it, every forward a known base: the table must give back exactly those figures."""
    from torch import nn

    from mpsearch.formats.base import QuantizedLinear

    model, _, layers = llava
    clock = _VirtualClock()
    factor = {"fp32": 1.0, INT8: 0.3}           # ms per (rows x in x out / 1e6)
    outside = {"fp32": 0.0, INT8: 0.011}        # ms per call, charged outside the Linear call
    base_ms = 2.5                               # ms per forward, charged before anything runs
    depth = [0]

    def fmt_of(m):
        return getattr(m, "_mps_format", "fp32")

    def cost(in_f, out_f, rows, fmt):
        return rows * in_f * out_f * 1e-6 * factor[fmt] + 0.001 * (in_f % 7)

    def charging(orig):
        def forward(self, x):
            if depth[0] == 0:
                clock.t_ms += cost(self.in_features, self.out_features, x.numel() // x.shape[-1], fmt_of(self))
            depth[0] += 1
            try:
                return orig(self, x)
            finally:
                depth[0] -= 1
        return forward

    def global_pre(m, _args):  # global pre-hooks run before the layer clock's own hooks
        if depth[0] == 0 and isinstance(m, (nn.Linear, QuantizedLinear)):
            clock.t_ms += outside[fmt_of(m)]

    monkeypatch.setattr(nn.Linear, "forward", charging(nn.Linear.forward))
    monkeypatch.setattr(QuantizedLinear, "forward", charging(QuantizedLinear.forward))
    top = model.register_forward_pre_hook(lambda *_: setattr(clock, "t_ms", clock.t_ms + base_ms))
    glob = torch.nn.modules.module.register_module_forward_pre_hook(global_pre)
    try:
        t = measure_latency_table(model, layers, _space(), Workload(**FAST), progress=False, log=lambda m: None,
                                  now=clock.now)
    finally:
        top.remove()
        glob.remove()
    rows = {x.name: t.meta["rows_observed"]["prefill"][x.group] for x in layers}
    assert t.base_ms == pytest.approx(base_ms, abs=1e-9)
    for x in layers:
        (seen,) = rows[x.name]
        for f in ("fp32", INT8):
            want = cost(x.in_features, x.out_features, sum(seen), f) + outside[f] if seen else 0.0
            assert t.ms[x.name][f] == pytest.approx(want, abs=1e-9), (x.name, f)
    assert t.meta["fit"]["prefill"]["overhead_ms_per_layer"] == pytest.approx({INT8: outside[INT8]}, abs=1e-9)
    assert t.meta["fit"]["prefill"]["fit_residual_max"] < 1e-9


def test_compiled_once_per_configuration_and_never_silently_eager(llava, monkeypatch):
    from mpsearch.latency import compile_stats
    from mpsearch.latency import compiled as compiled_mod

    model, _, _ = llava
    m = copy.deepcopy(model)
    w = Workload(compile="eager", **FAST)
    first = measure_model_latency(m, None, w)
    assert first.compile is not None and first.compile["backend"] == "eager"
    assert compile_stats()["configurations"] >= 1
    again = measure_model_latency(m, None, w)  # same configurations: nothing compiled again
    assert again.compile["configurations"] == 0 and again.compile["compilations"] == 0
    assert again.compile["recompilations"] == 0
    assert all(getattr(x, "_compiled_call_impl", None) is None for x in m.modules())  # model left eager
    monkeypatch.setattr(compiled_mod, "RECOMPILE_LIMIT", 1)
    with pytest.raises(MpsError, match="recompile limit"):
        measure_model_latency(m, None, Workload(compile="eager", batch=2, **FAST))  # new shapes, limit 1


def test_compile_value_names_a_mode_or_backend():
    from mpsearch.latency.compiled import compile_spec

    assert compile_spec(False) is None and compile_spec(True).backend == "inductor"
    assert compile_spec("reduce-overhead").mode == "reduce-overhead"
    with pytest.raises(MpsError, match="mode.*backend"):
        compile_spec("fastest")


def test_thread_check_warns_when_one_thread_wins(llava, monkeypatch):
    from mpsearch.latency import check_threads

    model, _, layers = llava
    fast_one = {1: 2.0, 2: 5.0}

    def fake_time(self, repeats, warmup):
        return Timing.from_samples([fast_one[torch.get_num_threads()]] * repeats)

    monkeypatch.setattr(PhaseRunner, "time", fake_time)
    msgs: list[str] = []
    check = check_threads(model, Workload(threads=2, repeats=2, warmup=0), log=msgs.append)
    assert check["one_thread_faster"] and check["threads"] == 2
    assert len(msgs) == 1 and "2.00 ms" in msgs[0] and "5.00 ms" in msgs[0] and "2 threads" in msgs[0]
    fast_one.update({1: 5.0, 2: 2.0})
    msgs.clear()
    assert not check_threads(model, Workload(threads=2), log=msgs.append)["one_thread_faster"] and not msgs
    assert check_threads(model, Workload(threads=1), log=msgs.append) is None
    # the table function runs the check and records the thread count it used
    fast_one.update({1: 2.0, 2: 5.0})
    monkeypatch.setattr(isolated_mod, "time_unique", lambda key, dtype, device, workload: 0.01)
    t = measure_latency_table(model, layers, _space(), Workload(threads=2, repeats=2, warmup=0), method="isolated",
                              progress=False, log=msgs.append)
    assert any("1 thread runs" in m for m in msgs)
    assert t.meta["threads"] == 2 and t.meta["thread_check"]["one_thread_faster"]
    assert t.to_dict()["provenance"]["threads"] == 2


def test_cpu_device_name_tells_apart_cpus_that_share_a_marketing_name():
    """Latency caches are keyed by the device name: a Zen 3 and a Zen 5 "AMD EPYC" time int8
    and bf16 several times apart, so their names must differ (family/model, kernel flags)."""
    from mpsearch.artifacts import cpu_description, parse_cpuinfo

    zen3 = parse_cpuinfo("processor : 0\nmodel name : AMD EPYC\ncpu family : 25\nmodel : 1\n"
                         "flags : fpu avx2 fma\n\nprocessor : 1\nmodel name : other\n")
    zen5 = parse_cpuinfo("processor : 0\nmodel name : AMD EPYC\ncpu family : 26\nmodel : 2\n"
                         "flags : fpu avx2 avx512f avx512_vnni avx512_bf16\n")
    assert zen3 == {"model name": "AMD EPYC", "cpu family": "25", "model": "1", "flags": ["fpu", "avx2", "fma"]}
    a, b = cpu_description(zen3, "AVX2", 2), cpu_description(zen5, "AVX512", 2)
    assert a == "cpu: AMD EPYC (2 cores; family 25 model 1; AVX2)"
    assert b == "cpu: AMD EPYC (2 cores; family 26 model 2; AVX512; avx512_vnni avx512_bf16)"
    # an Arm board: no family, its flags under "Features"
    arm = parse_cpuinfo("processor : 0\nFeatures : fp asimd\nCPU part : 0xd0c\n")
    assert cpu_description(arm, "DEFAULT", 4).endswith("(4 cores; DEFAULT)")
