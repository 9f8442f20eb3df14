"""Precision maps: round trip, rules, strict loading with the field and line named."""
from __future__ import annotations

import textwrap

import pytest
import yaml

from mpsearch.errors import ArtifactError, MpsError
from mpsearch.policy import Policy

NAMES = [
    "model.vision_tower.encoder.layers.0.self_attn.q_proj",
    "model.vision_tower.encoder.layers.0.mlp.fc1",
    "model.multi_modal_projector.linear_1",
    "model.language_model.layers.0.self_attn.q_proj",
    "model.language_model.layers.0.mlp.down_proj",
    "lm_head",
]


def write(tmp_path, text: str):
    p = tmp_path / "map.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_format_for_order_explicit_then_rules_then_default():
    p = Policy(
        {"model.language_model.layers.0.mlp.down_proj": "bnb.nf4"},
        default="fp32",
        rules=[("model.vision_tower.*", "bnb.int8"), ("model.*", "torch.int8dyn")],
    )
    assert p.format_for("model.language_model.layers.0.mlp.down_proj") == "bnb.nf4"
    assert p.format_for("model.vision_tower.encoder.layers.0.mlp.fc1") == "bnb.int8"  # first match wins
    assert p.format_for("model.multi_modal_projector.linear_1") == "torch.int8dyn"
    assert p.format_for("lm_head") == "fp32"


def test_round_trip_is_fully_expanded_with_provenance(tmp_path):
    p = Policy({NAMES[4]: "bnb.nf4"}, default="bf16", rules=[("model.vision_tower.*", "bnb.int8")], meta={"label": "x"})
    path = tmp_path / "p.yaml"
    p.to_yaml(path, layer_names=NAMES, model="demo", device="cpu", metrics={"kl": 0.01})
    doc = yaml.safe_load(path.read_text())
    assert doc["mpsearch"] == 1
    assert "rules" not in doc
    assert set(doc["layers"]) == set(NAMES)  # every layer listed
    assert doc["layers"][NAMES[0]] == "bnb.int8" and doc["layers"][NAMES[5]] == "bf16"
    assert doc["provenance"]["torch"] and doc["provenance"]["created"].endswith("Z")
    back = Policy.from_yaml(path)
    assert {n: back.format_for(n) for n in NAMES} == {n: p.format_for(n) for n in NAMES}
    assert back.meta["model"] == "demo" and back.meta["metrics"] == {"kl": 0.01}
    assert back.key() == p.resolve(NAMES).key()


def test_hand_written_rules_resolve_first_match(tmp_path):
    path = write(tmp_path, """\
        mpsearch: 1
        default: fp32
        layers:
          lm_head: torch.int8dyn
        rules:
          - {match: "model.vision_tower.*", format: bnb.int8}
          - {match: "*.q_proj", format: bnb.nf4}
        """)
    p = Policy.from_yaml(path).resolve(NAMES)
    assert p.formats[NAMES[0]] == "bnb.int8"  # vision q_proj: first rule wins over *.q_proj
    assert p.formats[NAMES[3]] == "bnb.nf4"
    assert p.formats[NAMES[2]] == "fp32"
    assert p.formats["lm_head"] == "torch.int8dyn"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("mpsearch: 1\ndefault: fp32\nlayerz: {}\n", "map.yaml:3: unknown field 'layerz'"),
        ("mpsearch: 2\ndefault: fp32\n", "map.yaml:1: field 'mpsearch' (schema version) is 2"),
        ("default: fp32\n", "field 'mpsearch' (schema version) is None"),
        ("mpsearch: 1\ndefault: fp33\n", "map.yaml:2: field 'default': unknown format 'fp33'"),
        ("mpsearch: 1\nlayers:\n  a.b: bf16\n  c.d: int3\n", "map.yaml:4: field layers['c.d']: unknown format 'int3'"),
        ("mpsearch: 1\nrules:\n  - {match: 'x*'}\n", "map.yaml:3: field rules[0].format is missing (required)"),
        ("mpsearch: 1\nlayers: [a, b]\n", "map.yaml:2: field 'layers' must map module paths to formats"),
        ("mpsearch: 1\nlayers: {a: bf16\n", "not valid YAML"),
        ("- just\n- a list\n", "a precision map is a YAML mapping"),
    ],
)
def test_malformed_maps_name_field_and_line(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ArtifactError) as exc:
        Policy.from_yaml(path)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_valid_formats_listed_in_error(tmp_path):
    path = write(tmp_path, "mpsearch: 1\ndefault: int4\n")
    with pytest.raises(ArtifactError, match=r"valid: .*bnb\.nf4"):
        Policy.from_yaml(path)


def test_yaml_is_read_with_safe_loader(tmp_path):
    path = write(tmp_path, "mpsearch: 1\ndefault: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ArtifactError, match="not valid YAML"):
        Policy.from_yaml(path)


def test_resolve_rejects_layers_of_another_model():
    with pytest.raises(MpsError, match=r"unknown layer 'model.language_model.layers.0.mlp.down_prj'.*did you mean"):
        Policy({"model.language_model.layers.0.mlp.down_prj": "bf16"}).resolve(NAMES)


def test_key_ignores_entries_equal_to_default():
    a = Policy.uniform("bnb.nf4", NAMES)
    b = Policy({}, default="bnb.nf4")
    c = Policy({NAMES[0]: "fp32"}, default="bnb.nf4")
    assert a.key() == b.key() != c.key()


def test_dict_round_trip():
    p = Policy({NAMES[0]: "bnb.int8"}, "fp32", {"label": "pareto-1"}, [("lm_*", "bf16")])
    q = Policy.from_dict(p.to_dict())
    assert q == p
