"""Accuracy, KL to fp32 and answer flips of the demo model under uniform policies.

Every format available on CPU applied to the whole model, and the 4-bit / 2-bit formats to the
vision tower alone and to the language model alone, scored on the synthetic validation split
(500 questions, official MMMU rules, logits mode) by `mps.evaluate`. Prints a Markdown table.

    python benchmarks/demo_uniform_policies.py [--limit N] [--threads 1] [--mode logits|generate]
"""
from __future__ import annotations

import argparse
import time

import torch

import mpsearch as mps
from mpsearch.policy import Policy

WHOLE = ["torch.int8dyn", "bnb.int8", "bnb.nf4", "bnb.fp4", "rtn.int4", "rtn.int3", "rtn.int2"]
PARTIAL = ["bnb.nf4", "rtn.int3", "rtn.int2"]


def policies(layers: list) -> list[Policy]:
    out = [Policy({}, default=f, meta={"label": f"all {f}"}) for f in WHOLE]
    for group in ("vision", "language"):
        names = [l.name for l in layers if l.group == group]
        for f in PARTIAL:
            out.append(Policy({n: f for n in names}, default="fp32", meta={"label": f"{group} only {f}"}))
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
    bench = mps.load_benchmark("synthetic", "validation", limit=args.limit)
    t0 = time.perf_counter()
    results = mps.evaluate(model, processor, policies(layers), bench, mode=args.mode, batch_size=50,
                           measure_latency=False, layers=layers, progress=False)
    seconds = time.perf_counter() - t0
    n = results[0].n
    print(f"demo model, synthetic/validation, {n} questions, mode {args.mode}, {args.threads} thread(s), "
          f"{seconds:.0f} s")
    print()
    print(f"| policy | weight MiB | accuracy | 95% CI | KL to fp32 | flips (of {n}) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        flips = round((r.flips or 0.0) * r.n)
        print(f"| {r.label} | {r.memory_bytes / 2**20:.3f} | {100 * r.accuracy:.1f}% | "
              f"{100 * r.accuracy_ci[0]:.1f}-{100 * r.accuracy_ci[1]:.1f} | {max(r.kl or 0.0, 0.0):.2e} | {flips} |")


if __name__ == "__main__":
    main()
