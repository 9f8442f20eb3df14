"""The shipped demo VLM: loads offline through the generic transformers path and really works."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mpsearch.tasks import synthetic
from mpsearch.tasks.prompts import encode_batch, option_letters, parse_options

DEMO = Path(__file__).resolve().parents[1] / "mpsearch" / "demo"

pytestmark = pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="demo weights not built")


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(2)
    processor = AutoProcessor.from_pretrained(DEMO, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(DEMO, local_files_only=True).eval()
    return model, processor


def _letter_predictions(model, processor, rows, batch=50):
    preds = []
    tok = processor.tokenizer
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i: i + batch]
            enc = encode_batch(processor, chunk)
            last = enc.pop("prompt_last")
            logits = model(**enc).logits[torch.arange(len(chunk)), last]
            for r, lg in zip(chunk, logits):
                letters = option_letters(len(parse_options(r["options"])))
                ids = tok.convert_tokens_to_ids(letters)
                preds.append(letters[int(lg[ids].argmax())])
    return preds


def test_loads_as_a_llava_with_the_documented_shape(demo):
    model, processor = demo
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    cfg = model.config
    assert cfg.vision_feature_layer == -1 and cfg.vision_feature_select_strategy == "default"
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    row = synthetic.generate("dev", n=1)[0]
    enc = encode_batch(processor, [row])
    assert int((enc["input_ids"] == cfg.image_token_id).sum()) == n_img
    assert processor.tokenizer.unk_token_id not in enc["input_ids"][0].tolist()
    # sized so that CPU kernels differ (the demo issue): language hidden >= 256, >= 64 image tokens
    assert cfg.text_config.hidden_size >= 256 and n_img >= 64
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    assert (DEMO / "model.safetensors").stat().st_size < 60 * 2**20
    assert all(p.name.endswith(".safetensors") or p.suffix != ".bin" for p in DEMO.iterdir())


def test_full_precision_accuracy_on_validation(demo):
    model, processor = demo
    rows = synthetic.generate("validation", n=270)
    preds = _letter_predictions(model, processor, rows)
    ok = [p == r["answer"] for p, r in zip(preds, rows)]
    acc = sum(ok) / len(rows)
    reasoning = [o for o, r in zip(ok, rows) if r["skill"] == "reasoning"]
    # measured on the 1008 validation questions: 79.1% (reasoning 77.5%), docs/benchmarks.md
    assert acc >= 0.74, acc
    assert sum(reasoning) / len(reasoning) >= 0.70


def test_blank_pictures_give_about_chance(demo):
    """The answers come from the picture: the same questions on a background-only picture."""
    from PIL import Image

    model, processor = demo
    rows = synthetic.generate("validation", n=270)
    blank = Image.new("RGB", (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE), synthetic.BACKGROUND)
    rows = [dict(r, image_1=blank) for r in rows]
    preds = _letter_predictions(model, processor, rows)
    acc = sum(p == r["answer"] for p, r in zip(preds, rows)) / len(rows)
    assert acc <= 0.40, acc  # chance is 25% (more_of: 50% from the question alone)


def test_greedy_generation_answers_with_a_bare_letter(demo):
    model, processor = demo
    rows = synthetic.generate("validation", n=8)
    enc = encode_batch(processor, rows, padding_side="left")
    enc.pop("prompt_last")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    texts = processor.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    answers = [t.strip() for t in texts]
    assert all(a in {"A", "B", "C", "D"} for a in answers), answers
    assert sum(a == r["answer"] for a, r in zip(answers, rows)) >= 5


def test_training_log_is_shipped_and_small():
    log = json.loads((DEMO / "training_log.json").read_text())
    assert log["final"]["validation_accuracy"] >= 0.78 and log["final"]["n"] == 1008
    assert (DEMO / "training_log.json").stat().st_size < 100_000
