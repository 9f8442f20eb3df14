"""The demo model's training recipe (``examples/train_demo_model.py``): its targets, weighted
losses, the tokens its auxiliary loss reads and its ``--init-from`` start, against references."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mpsearch.tasks import synthetic

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "mpsearch" / "demo"
sys.path.insert(0, str(ROOT / "examples"))
recipe = pytest.importorskip("train_demo_model")


@pytest.fixture(scope="module")
def scenes():
    return [a for _, a in synthetic.generate_with_attributes("train", n=24, seed=7)]


def test_cell_targets_kind_or_empty_and_occupied_kind(scenes):
    kinds = list(synthetic.SHAPES)
    t = recipe.attr_targets(scenes, occupied_kind=True)
    masked = recipe.attr_targets(scenes, kind_on_occupied=True)
    plain = recipe.attr_targets(scenes)
    assert "tok_kind_occ" not in plain
    n_occupied = 0
    for i, a in enumerate(scenes):
        if not a.get("cells"):  # a bar chart: no cell targets at all
            assert bool((t["tok_kind"][i] == -100).all() and (t["tok_kind_occ"][i] == -100).all())
            continue
        for j, cell in enumerate(a["cells"]):
            if cell is None:
                assert (int(t["tok_kind"][i, j]), int(t["tok_kind_occ"][i, j])) == (0, -100)
                assert int(masked["tok_kind"][i, j]) == -100
            else:
                n_occupied += 1
                assert int(t["tok_kind_occ"][i, j]) == kinds.index(cell[0])
                assert int(t["tok_kind"][i, j]) == kinds.index(cell[0]) + 1 == int(masked["tok_kind"][i, j])
    assert n_occupied > 20
    # the extra head changes none of the other targets
    assert all(torch.equal(plain[k], t[k]) for k in plain)


def test_attr_loss_weights_scale_only_the_named_heads(scenes):
    torch.manual_seed(0)
    head = recipe.AttrHead(16, 8, {**recipe.TOKEN_HEADS, **recipe.OCCUPIED_KIND_HEAD})
    logits = head(torch.randn(len(scenes), 64, 16))
    targets = recipe.expand_tokens(recipe.attr_targets(scenes, occupied_kind=True), head)
    ce = {k: torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[k].reshape(-1), ignore_index=-100)
          for k, lg in logits.items() if (targets[k] != -100).any()}
    weights = {"tok_kind_occ": 5.0, "kind_circle": 3.0}
    want = sum(weights.get(k, 1.0) * v for k, v in ce.items())
    assert torch.allclose(recipe.attr_loss(logits, targets, weights), want)
    assert torch.allclose(recipe.attr_loss(logits, targets), sum(ce.values()))


@pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="demo weights not built")
def test_init_from_loads_the_saved_weights_and_the_auxiliary_tokens_are_the_projector_output(tmp_path):
    torch.set_num_threads(2)
    processor = recipe.build_processor()
    model = recipe.build_model(processor, seed=1).eval()
    log = {"args": {"stage3_aux": 0.2}}
    stage, step = recipe.init_from(model, DEMO, log)
    assert (stage, step) == (2.5, 0)
    from transformers import AutoModelForImageTextToText
    saved = AutoModelForImageTextToText.from_pretrained(DEMO, local_files_only=True).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    import hashlib
    assert log["init_from"]["sha256"] == hashlib.sha256((DEMO / "model.safetensors").read_bytes()).hexdigest()
    shipped = json.loads((DEMO / "training_log.json").read_text())
    assert log["stage2"] == shipped["stage2"] and log["elapsed_s"] == shipped["elapsed_s"]

    # stage 3's auxiliary loss reads the projector's output of the training forward pass:
    # the same tensor the stage-1 heads were trained on (image_tokens)
    rows = [r for r, _ in synthetic.generate_with_attributes("train", n=2, seed=0)]
    b = recipe.Encoder(processor)(rows, [r["answer"] for r in rows])
    captured = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
        hook.remove()
        ref = recipe.image_tokens(model, b["pixel_values"])
    assert len(captured) == 1 and torch.equal(captured[0], ref)

    with pytest.raises(SystemExit, match="no model.safetensors"):
        recipe.init_from(model, tmp_path, {"args": {"stage3_aux": 0.0}})
