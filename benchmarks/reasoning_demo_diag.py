"""Where a reasoning-demo checkpoint stands: caption tokens, open answers, letters, letter lookup.

    python benchmarks/reasoning_demo_diag.py runs/reasoning-demo/_train_state/state.pt [--n 180]

Teacher-forced accuracy on the first ``--n`` validation questions of ``synthetic-reasoning``,
per question type: the first answer token of the open-ended variant, the multiple-choice
letter, the letter-lookup prompt (``pointer_variant``), and the caption tokens by kind (colour /
shape kind / digit / separators). Used for docs/benchmarks.md, "Reasoning demo model".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import train_reasoning_demo as recipe  # noqa: E402

from mpsearch.tasks import synthetic_reasoning as synthetic  # noqa: E402


def _kind(word: str) -> str:
    if word in synthetic.COLOURS:
        return "colour"
    if word in synthetic.SHAPES:
        return "kind"
    return "digit" if word.isdigit() else "separator/eos"


@torch.no_grad()
def diagnose(state_path: Path, n: int) -> dict:
    st = torch.load(state_path, weights_only=False)
    processor = recipe.build_processor()
    model = recipe.build_model(processor, 0)
    model.load_state_dict(st["model"])
    model.eval()
    enc, tok = recipe.Encoder(processor), processor.tokenizer
    pairs = synthetic.generate_with_attributes("validation", n=n, seed=0)
    variants = {"caption": recipe.caption_variant, "open": recipe.open_variant,
                "mc": lambda r, a: (r, r["answer"]), "pointer": recipe.pointer_variant}
    out: dict = {"stage": st["stage"], "step": st["step"]}
    for name, make in variants.items():
        samples, answers = zip(*[make(r, a) for r, a in pairs])
        b = enc(list(samples), list(answers))
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values=b["pixel_values"]).logits[:, :-1]
        labels = b["labels"][:, 1:]
        mask = labels != -100
        ok = (logits.argmax(-1) == labels) & mask
        if name == "caption":
            by_kind: dict[str, list[bool]] = {}
            for i in range(labels.shape[0]):
                words = tok.convert_ids_to_tokens(labels[i][mask[i]].tolist())
                for w, good in zip(words, ok[i][mask[i]].tolist()):
                    by_kind.setdefault(_kind(w), []).append(good)
            out[name] = {k: round(sum(v) / len(v), 3) for k, v in by_kind.items()}
            continue
        first = mask.float().argmax(1)
        hit = ok[torch.arange(len(first)), first].tolist()
        per: dict[str, list[bool]] = {}
        for (_, a), good in zip(pairs, hit):
            per.setdefault(a["qtype"], []).append(good)
        out[name] = {q: round(sum(v) / len(v), 2) for q, v in per.items()} | {"all": round(sum(hit) / len(hit), 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("state", type=Path, help="a _train_state/state.pt of examples/train_reasoning_demo.py")
    ap.add_argument("--n", type=int, default=180)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(diagnose(args.state, args.n), indent=1))


if __name__ == "__main__":
    main()
