"""Loading and layer discovery on tiny random models of real transformers classes (no downloads).

Every expectation here is written out independently of mpsearch.models: per-architecture module
prefixes for the groups, the q/k/v and gate/up sets for the ties, parameter counts from the real
tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from functools import lru_cache

import numpy as np
import pytest
import torch
from torch import nn

import mpsearch.models as models
from mpsearch.models import load as load_module
from mpsearch._cli import layers as layers_cli
from mpsearch.errors import MpsError
from mpsearch.models import (
    GROUPS, TINY_ARCHS, Layer, build_tiny_vlm, discover_layers, get_module, group_summary, load_vlm,
    model_info, model_source, register_quantized_module, set_module,
)

# Independent expectation: module prefix -> group, most specific first; and the exact layer
# count per group (2 blocks per tower).
LLAVA_PREFIXES = [("model.vision_tower.", "vision"), ("model.multi_modal_projector.", "projector"),
                  ("model.language_model.", "language"), ("lm_head", "head")]
QWEN_PREFIXES = [("model.visual.merger.", "projector"), ("model.visual.", "vision"),
                 ("model.language_model.", "language"), ("lm_head", "head")]
IDEFICS_PREFIXES = [("model.vision_model.", "vision"), ("model.connector.", "projector"),
                    ("model.text_model.", "language"), ("lm_head", "head")]
EXPECTED = {  # arch: (prefixes, counts per group, number of qkv ties, number of gate_up ties)
    "llava": (LLAVA_PREFIXES, {"vision": 12, "projector": 2, "language": 14, "head": 1}, 4, 2),
    "llava_next": (LLAVA_PREFIXES, {"vision": 12, "projector": 2, "language": 14, "head": 1}, 4, 2),
    "llava_onevision": (LLAVA_PREFIXES, {"vision": 12, "projector": 2, "language": 14, "head": 1}, 4, 2),
    "internvl": (LLAVA_PREFIXES, {"vision": 12, "projector": 2, "language": 14, "head": 1}, 4, 2),
    "qwen2_vl": (QWEN_PREFIXES, {"vision": 8, "projector": 2, "language": 14, "head": 1}, 2, 2),
    "qwen2_5_vl": (QWEN_PREFIXES, {"vision": 10, "projector": 2, "language": 14, "head": 1}, 2, 4),
    "idefics3": (IDEFICS_PREFIXES, {"vision": 12, "projector": 1, "language": 14, "head": 1}, 4, 2),
    "smolvlm": (IDEFICS_PREFIXES, {"vision": 12, "projector": 1, "language": 14, "head": 1}, 4, 2),
}
QKV = {"q_proj", "k_proj", "v_proj"}
GATE_UP = {"gate_proj", "up_proj"}


@lru_cache(maxsize=None)
def tiny(arch: str):
    """(model, processor) per arch, built once; smolvlm straight from its config (no processor)."""
    if arch == "smolvlm":
        import transformers as T

        cfg = T.SmolVLMConfig(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=28, patch_size=14),
            text_config=T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2),
            image_token_id=63, scale_factor=2)
        return T.SmolVLMForConditionalGeneration(cfg).eval(), None
    return load_vlm(f"tiny:{arch}")


def all_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def expected_group(name: str, prefixes) -> str:
    matches = [g for p, g in prefixes if name.startswith(p)]
    assert matches, f"test table has no prefix for {name}"
    return matches[0]


# ------------------------------------------------------------------ discovery on real classes


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_every_linear_in_the_right_group(arch):
    model, _ = tiny(arch)
    prefixes, counts, _, _ = EXPECTED[arch]
    found = discover_layers(model)
    assert [l.name for l in found] == list(all_linears(model))  # every nn.Linear, module order
    for layer in found:
        assert layer.group == expected_group(layer.name, prefixes), layer.name
    assert {g: sum(l.group == g for l in found) for g in GROUPS} == counts


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_tie_groups(arch):
    model, _ = tiny(arch)
    _, _, n_qkv, n_gate_up = EXPECTED[arch]
    found = discover_layers(model)
    by_key: dict[str, list[str]] = {}
    for layer in found:
        if layer.tie:
            by_key.setdefault(layer.tie, []).append(layer.name)
    qkv = {k: v for k, v in by_key.items() if k.endswith(".qkv")}
    gate_up = {k: v for k, v in by_key.items() if k.endswith(".gate_up")}
    assert len(qkv) == n_qkv and len(gate_up) == n_gate_up and len(by_key) == n_qkv + n_gate_up
    for key, names in qkv.items():
        parent = key.removesuffix(".qkv")
        assert sorted(names) == sorted(f"{parent}.{c}" for c in QKV)
    for key, names in gate_up.items():
        parent = key.removesuffix(".gate_up")
        assert sorted(names) == sorted(f"{parent}.{c}" for c in GATE_UP)
    # every q/k/v/gate/up layer is tied; nothing else is (fused qkv, o_proj, down_proj, fc1 are not)
    for layer in found:
        assert (layer.tie is not None) == (layer.name.rsplit(".", 1)[-1] in QKV | GATE_UP), layer.name


def test_qwen2_vl_fused_qkv_is_one_untied_layer_and_merger_is_projector():
    found = {l.name: l for l in discover_layers(tiny("qwen2_vl")[0])}
    qkv = found["model.visual.blocks.1.attn.qkv"]
    assert qkv.tie is None and qkv.group == "vision" and qkv.out_features == 3 * qkv.in_features
    assert found["model.visual.merger.mlp.0"].group == "projector"


@pytest.mark.parametrize("arch", ["llava", "internvl", "qwen2_5_vl", "idefics3"])
def test_depth_parsed_from_block_index(arch):
    for layer in discover_layers(tiny(arch)[0]):
        m = re.search(r"\.(?:layers|layer|blocks)\.(\d+)\.", layer.name)
        if layer.group in ("projector", "head"):
            assert layer.depth is None, layer.name
        else:
            assert m is not None and layer.depth == int(m.group(1)), layer.name


@pytest.mark.parametrize("arch", ["llava", "internvl", "qwen2_vl", "idefics3"])
def test_shapes_and_params_match_real_tensors(arch):
    model, _ = tiny(arch)
    for layer in discover_layers(model):
        mod = get_module(model, layer.name)
        assert (layer.out_features, layer.in_features) == tuple(mod.weight.shape)
        assert layer.bias == (mod.bias is not None)
        assert layer.params == mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)


def test_tied_head_weight_is_reported():
    model, _ = tiny("internvl")  # InternVL ties lm_head to the input embeddings (tie_word_embeddings)
    head = {l.name: l for l in discover_layers(model)}["lm_head"]
    emb = model.model.language_model.embed_tokens
    assert model.lm_head.weight is emb.weight
    assert head.weight_tied_to == "model.language_model.embed_tokens"
    assert all(l.weight_tied_to is None for l in discover_layers(tiny("llava")[0]))


def test_group_summary_counts_and_params():
    found = discover_layers(tiny("llava")[0])
    summary = group_summary(found)
    assert list(summary) == list(GROUPS)
    for g in GROUPS:
        mine = [l for l in found if l.group == g]
        assert summary[g] == {"count": len(mine), "params": sum(l.params for l in mine)}
    with pytest.raises(MpsError, match="group 'bogus'"):
        group_summary([Layer("x", "bogus", 1, 1, False)])


# ------------------------------------------------------------------ attribute fallback, errors


class _Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.wqkv, self.wo = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)


class _FFN(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)


class _InternLM2Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attention, self.feed_forward = _Attn(d), _FFN(d)


class _ViTBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


def _internlm2(d: int, vocab: int, n: int = 2) -> nn.Module:
    lm = nn.Module()
    lm.model = nn.Module()
    lm.model.tok_embeddings = nn.Embedding(vocab, d)
    lm.model.layers = nn.ModuleList(_InternLM2Block(d) for _ in range(n))
    lm.output = nn.Linear(d, vocab, bias=False)
    return lm


class FakeInternVLChat(nn.Module):
    """The module tree of the remote-code InternVL2 chat models (InternViT + mlp1 + InternLM2)."""

    def __init__(self, d: int = 8, vocab: int = 16) -> None:
        super().__init__()
        self.vision_model = nn.Module()
        self.vision_model.encoder = nn.Module()
        self.vision_model.encoder.layers = nn.ModuleList(_ViTBlock(d) for _ in range(2))
        self.mlp1 = nn.Sequential(nn.LayerNorm(4 * d), nn.Linear(4 * d, d), nn.GELU(), nn.Linear(d, d))
        self.language_model = _internlm2(d, vocab)


class FakeXComposer2(nn.Module):
    """InternLM-XComposer2: InternLM2 at ``model``/``output``, CLIP at ``vit.vision_tower``, ``vision_proj``."""

    def __init__(self, d: int = 8, vocab: int = 16) -> None:
        super().__init__()
        lm = _internlm2(d, vocab)
        self.model, self.output = lm.model, lm.output
        self.vit = nn.Module()
        self.vit.vision_tower = nn.Module()
        self.vit.vision_tower.vision_model = nn.Module()
        self.vit.vision_tower.vision_model.encoder = nn.Module()
        self.vit.vision_tower.vision_model.encoder.layers = nn.ModuleList(_ViTBlock(d) for _ in range(2))
        self.vision_proj = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))


def test_attribute_fallback_internvl2_chat_and_internlm2_ties():
    model = FakeInternVLChat()
    found = {l.name: l for l in discover_layers(model)}
    assert list(found) == list(all_linears(model))
    for name, layer in found.items():
        want = ("vision" if name.startswith("vision_model.") else "projector" if name.startswith("mlp1.")
                else "head" if name == "language_model.output" else "language")
        assert layer.group == want, name
    blk = "language_model.model.layers.1"
    assert found[f"{blk}.attention.wqkv"].tie is None  # fused: already one layer
    assert found[f"{blk}.feed_forward.w1"].tie == found[f"{blk}.feed_forward.w3"].tie == f"{blk}.feed_forward.gate_up"
    assert found[f"{blk}.feed_forward.w2"].tie is None
    assert found[f"{blk}.feed_forward.w1"].depth == 1 and found["vision_model.encoder.layers.0.attn.qkv"].depth == 0
    assert found["mlp1.1"].depth is None and found["language_model.output"].depth is None
    assert sum(l.tie is not None for l in found.values()) == 4  # w1/w3 in 2 blocks


def test_attribute_fallback_xcomposer2_root_model_is_language():
    found = {l.name: l for l in discover_layers(FakeXComposer2())}
    assert found["output"].group == "head"
    assert found["vision_proj.0"].group == found["vision_proj.2"].group == "projector"
    assert found["vit.vision_tower.vision_model.encoder.layers.1.mlp.fc2"].group == "vision"
    assert {l.group for n, l in found.items() if n.startswith("model.")} == {"language"}
    assert found["model.layers.0.feed_forward.w3"].tie == "model.layers.0.feed_forward.gate_up"


def test_unplaced_layer_is_reported_not_guessed():
    model = FakeInternVLChat()
    model.value_head = nn.Linear(8, 1)
    model.extra = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(MpsError, match=r"cannot place 2 linear layer\(s\) of FakeInternVLChat.*value_head, extra\.0") as err:
        discover_layers(model)
    assert "\n" not in str(err.value)


def test_no_vision_tower_is_an_error():
    import transformers as T

    llm = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(MpsError, match="no vision tower found in LlamaForCausalLM: is this a vision-language model"):
        discover_layers(llm)
    with pytest.raises(MpsError, match="no vision tower found in Sequential"):
        discover_layers(nn.Sequential(nn.Linear(2, 2)))


def test_multihead_attention_out_proj_is_not_listed():
    model = FakeInternVLChat()
    model.vision_model.pool = nn.MultiheadAttention(8, 2, batch_first=True)  # reads out_proj.weight directly
    names = [l.name for l in discover_layers(model)]
    assert "vision_model.pool.out_proj" not in names
    assert len(names) == len(all_linears(model)) - 1


def test_registered_linear_types_are_discovered():
    class Swapped(nn.Module):  # what a quantized replacement looks like: shape attributes, no nn.Linear
        def __init__(self, lin: nn.Linear) -> None:
            super().__init__()
            self.in_features, self.out_features, self.bias = lin.in_features, lin.out_features, lin.bias

    assert register_quantized_module(Swapped) is Swapped  # the public hook formats/ uses too
    model = FakeInternVLChat()
    before = discover_layers(model)
    set_module(model, "mlp1.1", Swapped(model.mlp1[1]))
    assert discover_layers(model) == before


# ------------------------------------------------------------------ module helpers


def test_get_and_set_module_with_numeric_paths():
    model = FakeInternVLChat()
    lin = get_module(model, "language_model.model.layers.1.feed_forward.w2")
    assert lin is model.language_model.model.layers[1].feed_forward.w2
    assert get_module(model, "mlp1.3") is model.mlp1[3] and get_module(model, "") is model
    new = nn.Linear(16, 8)
    assert set_module(model, "language_model.model.layers.1.feed_forward.w2", new) is lin
    assert model.language_model.model.layers[1].feed_forward.w2 is new
    set_module(model, "mlp1.3", nn.Identity())
    assert isinstance(model.mlp1[3], nn.Identity)
    with pytest.raises(MpsError, match=r"no module 'mlp1\.9'.*mlp1 has \['0', '1', '2', '3'\]"):
        get_module(model, "mlp1.9")
    with pytest.raises(MpsError, match="no module 'language_model.nope'"):
        set_module(model, "language_model.nope", nn.Identity())
    with pytest.raises(MpsError, match="must be an nn.Module"):
        set_module(model, "mlp1.1", "not a module")  # type: ignore[arg-type]


# ------------------------------------------------------------------ loading


def _image(seed: int):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (40, 50, 3), dtype=np.uint8))


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_tiny_pipeline_prompt_processor_forward(arch):
    from mpsearch.tasks.prompts import encode_batch

    model, processor = tiny(arch)
    assert processor is not None and not model.training
    assert sum(p.numel() for p in model.parameters()) < 400_000
    samples = [{"question": "<image 1> Which colour?", "options": "['red', 'blue']", "image_1": _image(0)},
               {"question": "Compare <image 1> and <image 2>.", "options": "['1', '2', '3']",
                "image_1": _image(1), "image_2": _image(2)}]
    batch = encode_batch(processor, samples, answers=["A", "C"])
    batch.pop("prompt_last")
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    vocab = model.get_output_embeddings().out_features
    assert abs(out.loss.item() - np.log(vocab)) < 1.0  # random weights: near-uniform predictions


def test_tiny_models_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, _ = build_tiny_vlm("llava")
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = build_tiny_vlm("llava")
    c, _ = build_tiny_vlm("llava", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    assert model_info(c) == {"model": "tiny:llava", "revision": None, "seed": 1}


def test_dtype_device_and_bad_arguments():
    model, processor = load_vlm("tiny:llava", dtype="bfloat16", load_processor=False)
    assert processor is None and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_vlm("tiny:llava", dtype=torch.float16)[0].parameters()} == {torch.float16}
    assert {p.dtype for p in load_vlm("tiny:llava", dtype="auto")[0].parameters()} == {torch.float32}
    with pytest.raises(MpsError, match="unknown dtype 'int3'; valid: float32, bfloat16, float16, auto"):
        load_vlm("tiny:llava", dtype="int3")
    with pytest.raises(MpsError, match="unknown tiny architecture 'nope'; valid: tiny:llava"):
        load_vlm("tiny:nope")
    with pytest.raises(MpsError, match="unknown device"):
        load_vlm("tiny:llava", device="gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(MpsError, match="no CUDA device is available"):
            load_vlm("tiny:llava", device="cuda")


def _save_tiny(path):
    model, processor = tiny("llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


def test_saved_tiny_model_loads_back_identically(tmp_path):
    model, processor = _save_tiny(tmp_path)
    loaded, lproc = load_vlm(str(tmp_path))
    assert type(loaded) is type(model) and type(lproc) is type(processor) and not loaded.training
    assert model_source(loaded) == str(tmp_path)
    assert discover_layers(loaded) == discover_layers(model)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}],
                                         add_generation_prompt=True)
    inputs = processor(text=text, images=_image(3), return_tensors="pt")
    again = lproc(text=text, images=_image(3), return_tensors="pt")
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**again).logits)


def test_round_trip_of_other_tiny_archs(tmp_path):
    model, processor = tiny("idefics3")
    model.save_pretrained(tmp_path / "idefics3")
    processor.save_pretrained(tmp_path / "idefics3")
    loaded, lproc = load_vlm(str(tmp_path / "idefics3"))
    assert type(lproc).__name__ == "Idefics3Processor"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    model, processor = tiny("internvl")  # image-only processor: no torchvision, so it cannot be saved
    model.save_pretrained(tmp_path / "internvl")
    with pytest.raises(MpsError, match="has no video processor and cannot be saved"):
        processor.save_pretrained(tmp_path / "internvl")
    loaded, none = load_vlm(str(tmp_path / "internvl"), load_processor=False)
    assert none is None and loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_demo_goes_through_the_directory_path(tmp_path, monkeypatch):
    monkeypatch.setattr(load_module, "DEMO_DIR", tmp_path / "empty")
    with pytest.raises(MpsError, match="the demo model is missing: .*empty has no config.json.*tiny:llava"):
        load_vlm("demo")
    _save_tiny(tmp_path / "demo")
    monkeypatch.setattr(load_module, "DEMO_DIR", tmp_path / "demo")
    model, processor = load_vlm("demo")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and processor is not None
    assert model_source(model) == "demo"


def test_missing_hub_model_offline_is_one_line_and_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(MpsError) as err:
        load_vlm("nonexistent-org-xyz/no-such-vlm")
    msg = str(err.value)
    assert time.perf_counter() - t0 < 5
    assert "\n" not in msg and "'nonexistent-org-xyz/no-such-vlm' not found" in msg
    assert load_module._hub_cache() in msg and "HF_HUB_OFFLINE=1" in msg
    assert "load_vlm('/path/to/dir')" in msg and "mpsearch <command> /path/to/dir" in msg


def test_missing_local_path_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(MpsError, match=f"model directory '{re.escape(str(missing))}' does not exist") as err:
        load_vlm(str(missing))
    assert "\n" not in str(err.value) and "/path/to/dir" in str(err.value)
    with pytest.raises(MpsError, match="has no config.json"):
        load_vlm(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MpsError, match="revisions apply to hub ids only"):
        load_vlm(str(tmp_path), revision="main")


def test_remote_code_model_needs_explicit_trust(tmp_path):
    cfg = {"model_type": "internvl_chat", "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                                                       "AutoModel": "modeling_internvl_chat.InternVLChatModel"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MpsError, match=r"ships its own modelling code.*trust_remote_code=True \(CLI: --trust-remote-code\)"):
        load_vlm(str(tmp_path))
    # trusted: a warning names the repository, then AutoModel runs (and fails here: no code files)
    with pytest.warns(UserWarning, match=f"running the modelling code shipped by '{re.escape(str(tmp_path))}'"):
        with pytest.raises(MpsError, match="could not load model .* with AutoModel"):
            load_vlm(str(tmp_path), trust_remote_code=True)


def test_text_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MpsError, match="model_type 'llama' is not a vision-language model"):
        load_vlm(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "made_up_vlm"}))
    with pytest.raises(MpsError, match="model_type 'made_up_vlm' is unknown to transformers"):
        load_vlm(str(tmp_path))


# ------------------------------------------------------------------ CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mpsearch")
    layers_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_layers_totals_equal_real_parameter_counts(capsys):
    args = _parse(["layers", "tiny:llava"])
    assert args.func is layers_cli.run and args.model == "tiny:llava"
    assert args.func(args) == 0
    out = capsys.readouterr().out
    totals = {m.group(1): (int(m.group(2)), int(m.group(3).replace(",", "")))
              for m in re.finditer(r"^\s+(\w+)\s+(\d+) layers\s+([\d,]+) params$", out, re.M)}
    model, _ = tiny("llava")
    real = {g: [0, 0] for g in (*GROUPS, "all")}
    for name, lin in all_linears(model).items():
        n = sum(p.numel() for p in lin.parameters())
        for g in (expected_group(name, LLAVA_PREFIXES), "all"):
            real[g][0] += 1
            real[g][1] += n
    assert totals == {g: tuple(v) for g, v in real.items()}
    assert "model.language_model.layers.0.self_attn.qkv" in out


def test_cli_layers_json_and_errors(capsys):
    args = _parse(["layers", "tiny:qwen2_vl", "--json", "--dtype", "float32"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "tiny:qwen2_vl" and data["class"] == "Qwen2VLForConditionalGeneration"
    assert data["total"]["count"] == len(data["layers"]) == 25
    assert data["groups"]["projector"]["count"] == 2
    with pytest.raises(MpsError, match="unknown dtype"):
        bad = _parse(["layers", "tiny:llava", "--dtype", "int3"])
        bad.func(bad)


def test_discover_layers_after_apply_policy_sees_the_same_layers():
    from mpsearch.formats import apply_policy
    from mpsearch.policy import Policy

    model, _ = load_vlm("tiny:llava")
    before = [(l.name, l.group, l.in_features, l.out_features) for l in discover_layers(model)]
    apply_policy(model, Policy({}, default="rtn.int4"))
    after = [(l.name, l.group, l.in_features, l.out_features) for l in discover_layers(model)]
    assert after == before


# ------------------------------------------------------------------ loading failures say what failed


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_safetensors_in_a_local_dir_is_named(tmp_path):
    _save_tiny(tmp_path)
    _truncate(tmp_path / "model.safetensors")
    with pytest.raises(MpsError) as err:
        load_vlm(str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and "not found" not in msg
    assert f"the weights of model '{tmp_path}' are corrupt or truncated: {tmp_path / 'model.safetensors'}" in msg
    assert "save_pretrained" in msg


def test_corrupt_safetensors_in_the_hub_cache_says_download_again(tmp_path, monkeypatch):
    from huggingface_hub import constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--some-org--tiny-vlm"
    snapshot = repo / "snapshots" / sha
    _save_tiny(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    _truncate(snapshot / "model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MpsError) as err:
        load_vlm("some-org/tiny-vlm")
    msg = str(err.value)
    assert "\n" not in msg and "not found" not in msg
    assert "corrupt or truncated" in msg and str(snapshot / "model.safetensors") in msg
    assert "Hugging Face cache" in msg and "downloaded again" in msg


def test_corrupt_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llava", ')
    with pytest.raises(MpsError, match=r"config\.json of model .* is corrupt .*config\.json.*save_pretrained"):
        load_vlm(str(tmp_path))


def test_permission_error_on_the_weights_names_the_file(tmp_path, monkeypatch):
    import errno

    import transformers.modeling_utils as modeling_utils

    _save_tiny(tmp_path)
    weights = tmp_path / "model.safetensors"
    if os.geteuid() != 0:  # a real unreadable file (root reads everything: simulate what the OS says)
        weights.chmod(0)
    else:
        def denied(path, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

        monkeypatch.setattr(modeling_utils, "safe_open", denied)
    try:
        with pytest.raises(MpsError) as err:
            load_vlm(str(tmp_path))
    finally:
        weights.chmod(0o644)
    msg = str(err.value)
    assert "\n" not in msg and "not found" not in msg
    assert f"permission denied reading {weights}" in msg and "permissions" in msg


def test_unreadable_model_dir_is_a_permission_error(tmp_path, monkeypatch):
    _save_tiny(tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path) else real_access(p, mode, **kw))
    with pytest.raises(MpsError, match=f"permission denied reading {re.escape(str(tmp_path))} while loading model directory"):
        load_vlm(str(tmp_path))


def test_bad_revision_and_gated_repo_say_so(monkeypatch):
    from types import SimpleNamespace

    import transformers.utils as tutils
    from huggingface_hub.errors import GatedRepoError, RevisionNotFoundError

    response = SimpleNamespace(status_code=404, headers={}, request=None)  # what the hub errors read

    def fails_with(error):
        def cached_file(*args, **kwargs):
            raise OSError("transformers' wrapper text") from error
        return cached_file

    monkeypatch.setattr(tutils, "cached_file", fails_with(RevisionNotFoundError("no such revision", response=response)))
    with pytest.raises(MpsError, match=r"revision 'v9' of 'org/vlm' does not exist \(no such branch, tag or commit\)"):
        load_vlm("org/vlm", revision="v9")
    monkeypatch.setattr(tutils, "cached_file", fails_with(GatedRepoError("gated", response=response)))
    with pytest.raises(MpsError, match="'org/vlm' is a gated repository: accept its terms"):
        load_vlm("org/vlm")
