"""``mpsearch evaluate`` and ``mpsearch report``: score policies on a benchmark, print the table.

Example:
    $ mpsearch evaluate demo --policies front.json --benchmark synthetic --split validation \\
          --mode logits --limit 100 -o results.jsonl
    $ mpsearch report results.jsonl
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from mpsearch._cli.common import add_model_args, load_model
from mpsearch.errors import MpsError
from mpsearch.evaluation.report import format_table


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` and ``report`` subcommands."""
    p = sub.add_parser(
        "evaluate", help="score policies on MMMU / SEED-Bench / the synthetic set (crash-safe JSONL results)",
        description="Apply each policy to MODEL (the full-precision model is always evaluated first), answer the "
                    "benchmark and append one record per policy to the results file. Rerunning skips what is done.")
    add_model_args(p)
    p.add_argument("--policies", nargs="*", default=[], metavar="FILE",
                   help="precision-map YAML(s) and/or front JSON(s) written by `mpsearch search`/`refine`")
    p.add_argument("--benchmark", default="mmmu", help="mmmu, seedbench or synthetic (default mmmu)")
    p.add_argument("--split", default=None, help="split (default: validation; test for seedbench)")
    p.add_argument("--mode", default="logits", choices=("logits", "generate"),
                   help="logits: one forward pass, option letters compared (MC only); generate: greedy decoding "
                        "parsed by the official MMMU rules (default logits)")
    p.add_argument("--limit", type=int, default=None, help="first N questions, round-robin over subjects")
    p.add_argument("--subjects", default=None, help="comma-separated subjects to keep")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="local copy of the benchmark (datasets.save_to_disk folder or hub snapshot) or a hub id")
    p.add_argument("-o", "--output", required=True, help="results JSONL (appended; existing records are reused)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32, help="generate mode: new tokens (default 32)")
    p.add_argument("--fallback", default="random", choices=("random", "none"),
                   help="unparseable multiple-choice answers: random letter (official, seeded) or wrong")
    p.add_argument("--placement", default="inline", choices=("inline", "first"),
                   help="images where their <image N> placeholders are, or all first")
    p.add_argument("--space", default=None, help="search space (file or shipped name): add its uniform policies")
    p.add_argument("--no-baselines", action="store_true", help="do not record the full-precision/uniform baselines")
    p.add_argument("--workload", default=None, help="latency workload, e.g. 'batch=1,phase=prefill,repeats=10'")
    p.add_argument("--no-latency", action="store_true", help="do not time the policies")
    p.add_argument("--latency-table", default=None, help="latency table JSON: adds the predicted latency")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0): recorded with the results")
    p.set_defaults(func=run_evaluate)

    r = sub.add_parser("report", help="print a results JSONL file as a table",
                       description="One row per record: policy, latency, memory, accuracy with its 95%% interval, "
                                   "flips, KL, fallbacks.")
    r.add_argument("results", nargs="+", help="results JSONL file(s)")
    r.add_argument("--sort", default=None, choices=("accuracy", "latency", "memory", "label"),
                   help="sort rows (default: file order)")
    r.add_argument("--refined", default=None, metavar="FILE",
                   help="refined front JSON (`mpsearch refine`): print the proxy's fidelity (default: refined.json "
                        "next to the first results file, if there)")
    r.set_defaults(func=run_report)


def run_evaluate(args: argparse.Namespace) -> int:
    """``mpsearch evaluate``: returns the exit code."""
    from mpsearch.evaluation import evaluate, load_policies
    from mpsearch.tasks import BENCHMARKS, load_benchmark

    policies: list[Any] = []
    for path in args.policies:  # read inputs before loading anything heavy
        policies.extend(load_policies(path))
    name = str(args.benchmark).lower()
    split = args.split or ("test" if name in ("seedbench", "seed") else "validation")
    if name not in BENCHMARKS and name not in ("seed", "demo"):
        raise MpsError(f"--benchmark {args.benchmark!r} unknown; valid: {', '.join(BENCHMARKS)}")
    bench = load_benchmark(name, split, path=args.data, subjects=args.subjects, limit=args.limit)
    bench.require_answers()
    space = None
    if args.space:
        from mpsearch.space import SearchSpace

        space = SearchSpace.from_yaml(args.space)
    workload = None
    if args.workload:
        from mpsearch.latency import Workload

        workload = Workload.parse(args.workload)
    table = None
    if args.latency_table:
        from mpsearch.latency import LatencyTable

        table = LatencyTable.from_json(args.latency_table)
    model, processor = load_model(args)
    from mpsearch.configs import EvaluateConfig

    config = EvaluateConfig(mode=args.mode, batch_size=args.batch_size, results_path=args.output, workload=workload,
                            latency_table=table, include_baselines=not args.no_baselines, seed=args.seed,
                            max_new_tokens=args.max_new_tokens, placement=args.placement, fallback=args.fallback,
                            measure_latency=not args.no_latency)
    results = evaluate(model, processor, policies, bench, space=space, config=config)
    print(f"{bench.name} {bench.split} ({len(bench)} questions, from {bench.source}), mode {args.mode}")
    for note in bench.notes:
        print(f"  note: {note}")
    print(format_table(results))
    print(f"results: {args.output}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """``mpsearch report``: returns the exit code."""
    from pathlib import Path

    from mpsearch.evaluation import read_results

    results = []
    for path in args.results:
        if not Path(path).is_file():
            raise MpsError(f"{path}: no such file (give a results JSONL written by `mpsearch evaluate -o`)")
        results.extend(read_results(path))
    if not results:
        raise MpsError(f"{', '.join(args.results)}: no result records")
    if args.sort == "accuracy":
        results.sort(key=lambda r: -r.accuracy)
    elif args.sort == "latency":
        results.sort(key=lambda r: (r.latency_ms is None, r.latency_ms or 0.0))
    elif args.sort == "memory":
        results.sort(key=lambda r: (r.memory_bytes is None, r.memory_bytes or 0))
    elif args.sort == "label":
        results.sort(key=lambda r: r.label)
    print(format_table(results))
    refined = Path(args.refined) if getattr(args, "refined", None) else Path(args.results[0]).parent / "refined.json"
    if getattr(args, "refined", None) and not refined.is_file():
        raise MpsError(f"--refined {refined}: no such file (give the front JSON written by `mpsearch refine`)")
    if refined.is_file():
        from mpsearch.searching._fidelity import fidelity_lines, proxy_fidelity

        print("\n".join(fidelity_lines(proxy_fidelity(refined))))
    skipped = {r.n_skipped for r in results if r.n_skipped}
    if skipped:
        print("note: logits mode scores multiple-choice questions only; open questions were skipped", file=sys.stdout)
    return 0
