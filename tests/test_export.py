"""Export to compressed-tensors (vLLM / transformers) and torchao configs (mpsearch.export).

Every checkpoint is loaded back with plain transformers (``AutoModelForImageTextToText``),
without mpsearch, and its logits are compared with mpsearch's own quantized model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mpsearch as mps
from mpsearch.cli import main
from mpsearch.errors import MpsError
from mpsearch.formats import get_format, module_bytes

pytest.importorskip("compressed_tensors")
from transformers import AutoModelForImageTextToText  # noqa: E402


def _image(seed: int = 0, size: int = 28):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size, size, 3), dtype=np.uint8))


def _inputs(processor, seed: int = 0, size: int = 28) -> dict:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return dict(processor(images=_image(seed, size), text=text, return_tensors="pt"))


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _mixed(layers, int4: str = "rtn.int4g128", int8: str = "rtn.int8ch", full: str = "fp32") -> mps.Policy:
    """int4 on every layer whose in_features is a multiple of 128, int8 elsewhere, head in full precision."""
    fmts = {}
    for l in layers:
        if l.group == "head":
            fmts[l.name] = full
        elif l.in_features % 128 == 0 and l.tie is None:
            fmts[l.name] = int4
        else:
            fmts[l.name] = int8
    return mps.Policy(fmts, default=full)


def _quant_config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]


# -- the formats it adds and the lists -----------------------------------------------------------
def test_exportable_formats_lists():
    ct = mps.exportable_formats("compressed-tensors")
    assert {"fp32", "bf16", "fp16", "rtn.int8ch", "rtn.int4g128", "torch.int8dyn"} <= set(ct)
    assert not {"bnb.nf4", "bnb.int8", "bnb.fp4", "rtn.int4", "rtn.int3", "ao.int4wo"} & set(ct)
    ao = mps.exportable_formats("torchao")
    assert {"ao.int8wo", "ao.int4wo", "ao.fp8", "rtn.int4g128", "torch.int8dyn"} <= set(ao)
    assert "bnb.nf4" not in ao
    with pytest.raises(MpsError, match="unknown export format 'gguf'; valid: compressed-tensors, torchao"):
        mps.exportable_formats("gguf")


@pytest.mark.parametrize("name,shape", [("rtn.int8ch", (96, 40)), ("rtn.int4g128", (256, 24))])
def test_symmetric_rtn_formats_bytes_and_numerics(name, shape):
    fmt = get_format(name)
    lin = torch.nn.Linear(*shape, bias=True)
    m = fmt.make_module(lin)
    assert module_bytes(m) == fmt.storage_bytes(*shape, bias=True)
    q = m.inner.codes()
    bits = int(fmt.bits)
    assert q.dtype == torch.int8 and q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
    w = fmt.quantize_weight(lin.weight.detach())
    groups = m.inner.scale.shape[1]
    expect = (q.view(shape[1], groups, -1).float() * m.inner.scale.float().unsqueeze(2)).view(shape[1], shape[0])
    assert torch.equal(w, expect)
    err = (w - lin.weight).abs().max() / lin.weight.abs().max()
    assert 0 < err < (0.01 if bits == 8 else 0.1)
    x = torch.randn(3, shape[0])
    assert torch.allclose(m(x), torch.nn.functional.linear(x, w, lin.bias), atol=1e-5)


def test_int4g128_refuses_partial_groups():
    with pytest.raises(MpsError, match="needs in_features a multiple of 128.*has 64"):
        get_format("rtn.int4g128").make_module(torch.nn.Linear(64, 8))


# -- the judged case: tiny LLaVA, mixed int8 / int4 ---------------------------------------------
def test_llava_mixed_int8_int4_loads_in_transformers_with_equal_logits(tmp_path):
    model, processor = mps.load_vlm("tiny:llava")
    layers = mps.discover_layers(model)
    policy = _mixed(layers)
    assert {"rtn.int4g128", "rtn.int8ch", "fp32"} == set(policy.formats.values())
    out = mps.export_checkpoint(model, policy, tmp_path / "ckpt", processor=processor)

    cfg = _quant_config(out)
    assert cfg["quant_method"] == "compressed-tensors"
    assert len(cfg["config_groups"]) >= 2
    assert cfg["ignore"] == ["lm_head"]
    targets = {t: g for g, v in cfg["config_groups"].items() for t in v["targets"]}
    assert set(targets) == {l.name for l in layers if l.name != "lm_head"}  # exact module paths
    schemes = {(v["weights"]["num_bits"], v["weights"]["strategy"], v["weights"]["group_size"])
               for v in cfg["config_groups"].values()}
    assert schemes == {(8, "channel", None), (4, "group", 128)}
    assert (out / "processor_config.json").exists() and (out / "tokenizer.json").exists()

    inputs = _inputs(processor)
    fp = _logits(model, inputs)
    mps.apply_policy(model, policy)
    ref = _logits(model, inputs)
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    got = _logits(loaded, inputs)
    assert _rel(got, ref) <= 1e-3
    assert _rel(fp, ref) > 1e-3  # the quantization is really there
    # the loaded dense weights are exactly the ones mpsearch ran with
    name = "model.language_model.layers.0.mlp.down_proj"
    ran = get_format("rtn.int4g128").dequantized(dict(model.named_modules())[name].inner)
    assert torch.equal(dict(loaded.named_modules())[name].weight.float(), ran)


def test_qwen2_vl_mixed_export(tmp_path):
    model, processor = mps.load_vlm("tiny:qwen2_vl")
    policy = _mixed(mps.discover_layers(model))
    out = mps.export_checkpoint(model, policy, tmp_path / "qwen")  # its tiny processor cannot be saved
    assert len(_quant_config(out)["config_groups"]) == 2
    inputs = _inputs(processor, size=56)
    mps.apply_policy(model, policy)
    ref = _logits(model, inputs)
    got = _logits(AutoModelForImageTextToText.from_pretrained(out), inputs)
    assert _rel(got, ref) <= 1e-3


def test_already_quantized_model_exports_the_same(tmp_path):
    model, processor = mps.load_vlm("tiny:llava")
    policy = _mixed(mps.discover_layers(model))
    a = mps.export_checkpoint(model, policy, tmp_path / "a")
    mps.apply_policy(model, policy)
    b = mps.export_checkpoint(model, policy, tmp_path / "b")
    from safetensors.torch import load_file

    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    other = mps.Policy({**policy.formats, "model.language_model.layers.0.self_attn.o_proj": "fp32"}, "fp32")
    with pytest.raises(MpsError, match="runs in 'rtn.int8ch' in this model but the policy says 'fp32'"):
        mps.export_checkpoint(model, other, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_torch_int8dyn_exports_exact_weights_as_w8a8(tmp_path):
    model, processor = mps.load_vlm("tiny:llava")
    policy = mps.Policy({}, default="torch.int8dyn", rules=[("lm_head", "fp32")])
    out = mps.export_checkpoint(model, policy, tmp_path / "w8a8")
    (group,) = _quant_config(out)["config_groups"].values()
    assert group["format"] == "int-quantized"
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    mps.apply_policy(model, policy)
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    # activations: PyTorch quantizes them per tensor, compressed-tensors per token: close, not equal
    inputs = _inputs(processor)
    rel = _rel(_logits(loaded, inputs), _logits(model, inputs))  # the first forward decompresses W8A8
    assert rel < 0.1
    mods = dict(model.named_modules())
    checked = 0
    for name, m in loaded.named_modules():
        if name in mods and hasattr(mods[name], "_mps_format"):
            ran = get_format("torch.int8dyn").dequantized(mods[name].inner)
            assert torch.equal(m.weight.float(), ran), name
            checked += 1
    assert checked == 28


# -- refusals: one line, nothing written --------------------------------------------------------
def test_bnb_nf4_is_refused_naming_the_layer(tmp_path):
    model, _ = mps.load_vlm("tiny:llava")
    layer = "model.language_model.layers.1.mlp.down_proj"
    policy = mps.Policy({layer: "bnb.nf4"}, default="rtn.int8ch")
    out = tmp_path / "never"
    with pytest.raises(MpsError) as info:
        mps.export_checkpoint(model, policy, out)
    msg = str(info.value)
    assert "\n" not in msg and layer in msg and "'bnb.nf4'" in msg and "rtn.int4g128" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unholdable_layer_is_refused_before_writing(tmp_path):
    model, _ = mps.load_vlm("tiny:llava")
    policy = mps.Policy({"model.language_model.layers.0.self_attn.o_proj": "rtn.int4g128"}, default="fp32")
    with pytest.raises(MpsError, match="o_proj.*multiple of 128"):
        mps.export_checkpoint(model, policy, tmp_path / "never")
    assert list(tmp_path.iterdir()) == []


def test_tie_group_with_two_schemes_is_refused(tmp_path):
    model, _ = mps.load_vlm("tiny:llava")
    base = "model.language_model.layers.0.self_attn."
    policy = mps.Policy({base + "q_proj": "fp32", base + "k_proj": "rtn.int8ch", base + "v_proj": "rtn.int8ch"},
                        default="fp32")
    with pytest.raises(MpsError, match=r"tie group 'model\.language_model\.layers\.0\.self_attn\.qkv' mixes schemes "
                                       r"\(q_proj=fp32, k_proj=rtn.int8ch, v_proj=rtn.int8ch\)"):
        mps.export_checkpoint(model, policy, tmp_path / "never")
    # the search space's ties are used when given
    space = mps.SearchSpace.from_yaml("cpu")
    up = mps.Policy({"model.language_model.layers.1.mlp.up_proj": "rtn.int8ch"}, default="fp32")
    with pytest.raises(MpsError, match=r"tie group 'model\.language_model\.layers\.1\.mlp\.\{gate_proj\+up_proj\}'"):
        mps.export_checkpoint(model, up, tmp_path / "never", space=space)
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_not_overwritten(tmp_path):
    model, _ = mps.load_vlm("tiny:llava")
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    policy = mps.Policy({"model.language_model.layers.0.mlp.down_proj": "rtn.int4g128"}, default="fp32")
    with pytest.raises(MpsError, match="exists and is not an empty directory"):
        mps.export_checkpoint(model, policy, out)
    assert (out / "keep.txt").read_text() == "mine"
    mps.export_checkpoint(model, policy, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


# -- CLI ----------------------------------------------------------------------------------------
def _map(tmp_path: Path, model_name: str, policy: mps.Policy, layers) -> Path:
    path = tmp_path / "policy.yaml"
    policy.to_yaml(path, [l.name for l in layers], model=model_name)
    return path


def test_cli_refuses_nf4_with_exit_2_and_one_line(capsys, tmp_path):
    model, _ = mps.load_vlm("tiny:llava")
    layers = mps.discover_layers(model)
    layer = "model.vision_tower.encoder.layers.0.mlp.fc1"
    path = _map(tmp_path, "tiny:llava", mps.Policy({layer: "bnb.nf4"}, default="fp32"), layers)
    out = tmp_path / "ckpt"
    code = main(["export", str(path), "--to", "compressed-tensors", "-o", str(out)])
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.startswith("error: ")]
    assert code == 2 and len(lines) == 1
    assert layer in lines[0] and "bnb.nf4" in lines[0] and "exportable formats:" in lines[0]
    assert not out.exists()


def test_cli_exports_the_demo_map_and_it_round_trips(capsys, tmp_path):
    """The demo's policy exported from its precision map, loaded back without mpsearch.

    Independent of the demo's accuracy (its weights are retrained from time to time): only that
    the checkpoint reproduces mpsearch's quantized model.
    """
    model, processor = mps.load_vlm("demo")
    layers = mps.discover_layers(model)
    policy = _mixed(layers)
    path = _map(tmp_path, "demo", policy, layers)
    out = tmp_path / "demo-ct"
    assert main(["export", str(path), "--to", "compressed-tensors", "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    cfg = _quant_config(out)
    assert len(cfg["config_groups"]) == 2 and "lm_head" in cfg["ignore"]
    qmodel, _ = mps.load_quantized("demo", path)
    size = processor.image_processor.crop_size["height"] if hasattr(processor.image_processor, "crop_size") else 64
    inputs = _inputs(processor, size=size)
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    assert _rel(_logits(loaded, inputs), _logits(qmodel, inputs)) <= 1e-3
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(out) is not None  # processor files travel with the checkpoint


def test_cli_torchao_json(tmp_path):
    model, _ = mps.load_vlm("tiny:llava")
    layers = mps.discover_layers(model)
    path = _map(tmp_path, "tiny:llava", _mixed(layers, int8="torch.int8dyn"), layers)
    out = tmp_path / "ao"
    assert main(["export", str(path), "--to", "torchao", "-o", str(out)]) == 0
    data = json.loads((out / "torchao_config.json").read_text())
    table = data["_data"]["fqn_to_config"]
    assert data["_type"] == "FqnToConfig" and set(table) == {l.name for l in layers}
    assert table["lm_head"] is None
    assert table["model.language_model.layers.0.mlp.down_proj"]["_type"] == "IntxWeightOnlyConfig"
    assert table["model.language_model.layers.0.self_attn.q_proj"]["_type"] == "Int8DynamicActivationInt8WeightConfig"


# -- torchao --------------------------------------------------------------------------------------
def test_torchao_config_dict_and_refusals():
    from mpsearch.export import torchao_config, torchao_config_dict

    model, _ = mps.load_vlm("tiny:llava")
    policy = mps.Policy({"lm_head": "ao.int8wo", "model.language_model.layers.0.mlp.down_proj": "ao.int4wo"},
                        default="fp32")
    d = torchao_config_dict(model, policy)
    json.dumps(d)  # plain JSON
    table = d["_data"]["fqn_to_config"]
    assert table["lm_head"] == {"_type": "Int8WeightOnlyConfig", "_version": 1, "_data": {}}
    assert table["model.language_model.layers.0.mlp.down_proj"]["_data"]["group_size"] == 128
    with pytest.raises(MpsError, match=r"layer 'lm_head' has format 'rtn\.int4', which has no torchao config"):
        torchao_config_dict(model, mps.Policy({"lm_head": "rtn.int4"}, default="fp32"))
    try:
        import torchao  # noqa: F401
    except ImportError:
        with pytest.raises(MpsError, match="torchao_config needs torchao"):
            torchao_config(model, policy)
    else:  # pragma: no cover - torchao is not installed on the development machine
        cfg = torchao_config(model, policy)
        assert type(cfg).__name__ == "FqnToConfig"
