"""Search spaces: groups, pins, ties, device checks, strict loading."""
from __future__ import annotations

import pytest

from mpsearch.errors import ArtifactError, MpsError
from mpsearch.models import Layer
from mpsearch.space import SearchSpace, shipped_spaces


def layer(name, group, i=8, o=8):
    return Layer(name=name, group=group, in_features=i, out_features=o, bias=False, tie=None, depth=None)


LAYERS = [
    layer("v.layers.0.self_attn.q_proj", "vision"),
    layer("v.layers.0.self_attn.k_proj", "vision"),
    layer("v.layers.0.self_attn.v_proj", "vision"),
    layer("v.layers.0.self_attn.out_proj", "vision"),
    layer("proj.linear_1", "projector"),
    layer("l.layers.0.self_attn.q_proj", "language"),
    layer("l.layers.0.self_attn.k_proj", "language"),
    layer("l.layers.0.self_attn.v_proj", "language"),
    layer("l.layers.0.mlp.gate_proj", "language"),
    layer("l.layers.0.mlp.up_proj", "language"),
    layer("l.layers.0.mlp.down_proj", "language"),
    layer("lm_head", "head"),
]


def test_shipped_spaces_load():
    assert {"cpu", "gpu-bnb", "gpu-ao", "llm-only"} <= set(shipped_spaces())
    for name in shipped_spaces():
        s = SearchSpace.from_yaml(name)
        assert s.formats()


def test_candidates_and_pins():
    s = SearchSpace.from_yaml("gpu-bnb")
    assert s.candidates(LAYERS[-1]) == ["bf16"]  # pinned *lm_head
    assert s.candidates(LAYERS[5]) == ["bf16", "bnb.int8", "bnb.nf4", "bnb.fp4"]
    assert s.candidates(LAYERS[4]) == ["bf16"]


def test_decisions_tie_qkv_and_gate_up():
    s = SearchSpace.from_yaml("cpu")
    ds = s.decisions(LAYERS)
    by_layer = {n: d for d in ds for n in d.layers}
    assert by_layer["l.layers.0.self_attn.q_proj"] is by_layer["l.layers.0.self_attn.v_proj"]
    assert by_layer["l.layers.0.mlp.gate_proj"].layers == ("l.layers.0.mlp.gate_proj", "l.layers.0.mlp.up_proj")
    assert by_layer["v.layers.0.self_attn.q_proj"].layers == (
        "v.layers.0.self_attn.q_proj", "v.layers.0.self_attn.k_proj", "v.layers.0.self_attn.v_proj")
    # 12 layers: vision qkv(1) + out(1) + proj(1) + lang qkv(1) + gate_up(1) + down(1) + head(1)
    assert len(ds) == 7
    assert sorted(n for d in ds for n in d.layers) == sorted(l.name for l in LAYERS)


def test_tie_choices_are_the_intersection_and_pins_leave_ties():
    s = SearchSpace("t", {"vision": ["fp32"], "projector": ["fp32"], "language": ["fp32", "bnb.int8", "bnb.nf4"],
                          "head": ["fp32"]}, pin={"*.k_proj": "bnb.int8"}, tie=[["q_proj", "k_proj", "v_proj"]])
    ds = {d.key: d for d in s.decisions(LAYERS)}
    k = ds["l.layers.0.self_attn.k_proj"]
    assert k.choices == ("bnb.int8",) and k.fixed
    qv = [d for d in ds.values() if "l.layers.0.self_attn.q_proj" in d.layers][0]
    assert qv.layers == ("l.layers.0.self_attn.q_proj", "l.layers.0.self_attn.v_proj")


def test_nothing_to_search_is_an_error():
    s = SearchSpace("pinned", {"vision": ["fp32"], "projector": ["fp32"], "language": ["fp32"], "head": ["fp32"]})
    with pytest.raises(MpsError, match="leaves nothing to search"):
        s.searchable(LAYERS)


def test_device_check_refuses_cpu_only_format_on_cuda():
    with pytest.raises(MpsError, match=r"torch.int8dyn.*cannot run on cuda"):
        SearchSpace.from_yaml("cpu", device="cuda")


def test_unknown_format_and_field_named(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: s\ngroups:\n  language: [fp32, int5]\n")
    with pytest.raises(ArtifactError, match=r"s.yaml:3: field groups\['language'\]\[1\]: unknown format 'int5'"):
        SearchSpace.from_yaml(p)
    p.write_text("name: s\ngroups: {language: [fp32]}\npins: {}\n")
    with pytest.raises(ArtifactError, match=r"s.yaml:3: unknown field 'pins'"):
        SearchSpace.from_yaml(p)
    with pytest.raises(MpsError, match="not a shipped space"):
        SearchSpace.from_yaml("no-such-space")


def test_group_missing_from_space_is_named():
    s = SearchSpace("s", {"language": ["fp32"]})
    with pytest.raises(MpsError, match="no formats for group 'vision'"):
        s.candidates(LAYERS[0])
