"""Accuracy per skill, KL to fp32 and answer flips of the demo model under uniform policies.

Every format of the shipped ``cpu`` space applied to every layer that may take it (the space's
uniform policies, as ``mpsearch run`` evaluates them), and the 2-4 bit formats to the vision
tower alone and to the language model alone, scored on the synthetic validation split (official
MMMU rules, logits mode) by ``mps.evaluate``. Also prints the full-precision model's answer
margins (log-probability of its chosen option letter minus the runner-up's), per skill: where
margins are small, quantization error moves answers. Prints Markdown tables.

    python benchmarks/demo_uniform_policies.py [--limit N] [--threads 1] [--mode logits|generate]
"""
from __future__ import annotations

import argparse
import time

import torch

import mpsearch as mps
from mpsearch.policy import Policy

PARTIAL = ["rtn.int4", "rtn.int3", "rtn.int2"]


def partial_policies(layers: list) -> list[Policy]:
    out = []
    for group in ("vision", "language"):
        names = [l.name for l in layers if l.group == group]
        for f in PARTIAL:
            out.append(Policy({n: f for n in names}, default="fp32", meta={"label": f"{group} only {f}"}))
    return out


def margins(model, processor, bench) -> dict[str, list[float]]:
    """Per skill, the fp32 model's margin (logprob of its answer letter minus the runner-up's)."""
    from mpsearch.evaluation.answer import letter_token_ids, run_pass
    from mpsearch.tasks.prompts import render_prompt

    positions = list(range(len(bench)))
    letters = sorted({c for i in positions for c in bench.question(i).choices})
    text, _ = render_prompt(processor, bench[0], "inline")
    ids = letter_token_ids(processor, text, letters)
    ps = run_pass(model, processor, bench, positions, "logits", 50, 1, "inline", "random", ids, None, "margins",
                  progress=False)
    out: dict[str, list[float]] = {}
    for i in positions:
        q = bench.question(i)
        scores = sorted((max(float(ps.logprobs[i][t]) for t in ids[c]) for c in q.choices), reverse=True)
        out.setdefault(q.skill or "-", []).append(scores[0] - scores[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", default="logits", choices=["logits", "generate"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = mps.load_vlm("demo")
    layers = mps.discover_layers(model)
    space = mps.SearchSpace.from_yaml("cpu")
    bench = mps.load_benchmark("synthetic", "validation", limit=args.limit)
    t0 = time.perf_counter()
    results = mps.evaluate(model, processor, partial_policies(layers), bench, mode=args.mode, batch_size=50,
                           space=space, measure_latency=False, layers=layers, progress=False)
    seconds = time.perf_counter() - t0
    n = results[0].n
    skills = sorted(results[0].per_skill)
    print(f"demo model, synthetic/validation, {n} questions, mode {args.mode}, {args.threads} thread(s), "
          f"{seconds:.0f} s")
    print()
    print(f"| policy | weight MiB | accuracy (95% CI) | " + " | ".join(skills) + f" | KL to fp32 | flips (of {n}) |")
    print("|---|---|---|" + "---|" * len(skills) + "---|---|")
    for r in results:
        flips = round((r.flips or 0.0) * r.n)
        per = " | ".join(f"{100 * r.per_skill[s]:.1f}%" for s in skills)
        print(f"| {r.label} | {r.memory_bytes / 2**20:.3f} | {100 * r.accuracy:.1f}% "
              f"({100 * r.accuracy_ci[0]:.1f}-{100 * r.accuracy_ci[1]:.1f}) | {per} | "
              f"{max(r.kl or 0.0, 0.0):.2e} | {flips} |")
    print()
    print("full-precision answer margins (logprob of the chosen letter minus the runner-up's):")
    print()
    print("| skill | n | < 0.5 | < 1 | < 2 | median |")
    print("|---|---|---|---|---|---|")
    for skill, m in sorted(margins(model, processor, bench).items()):
        t = torch.tensor(m)
        print(f"| {skill} | {len(m)} | {100 * float((t < 0.5).float().mean()):.1f}% | "
              f"{100 * float((t < 1).float().mean()):.1f}% | {100 * float((t < 2).float().mean()):.1f}% | "
              f"{float(t.median()):.2f} |")


if __name__ == "__main__":
    main()
