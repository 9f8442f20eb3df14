"""``mpsearch profile``: per-layer, per-format sensitivity of a model, and rank agreement of two reports.

Example:
    $ mpsearch profile demo --method hessian --data synthetic --split dev --samples 32 --space cpu -o sens.json
    $ mpsearch profile demo --method kl -o kl.json --compare sens.json     # profile, then compare
    $ mpsearch profile --compare sens.json kl.json                         # compare two reports only
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from mpsearch.configs import ProfileConfig
from mpsearch.errors import MpsError

METHODS = ("hessian", "fisher", "activation", "kl")
BENCHMARK_NAMES = ("mmmu", "seedbench", "synthetic")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile", help="sensitivity of every layer in every candidate format (hessian, fisher, activation, kl)",
        description="Score how much worse MODEL gets when one layer runs in one format, for every layer and every "
                    "format of the search space, on calibration data; write the report as JSON. With --compare, "
                    "print the Spearman rank agreement with another report (overall, per group, per format).")
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local directory, 'demo' or 'tiny:<arch>' (omit with --compare A.json B.json)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: the model's)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own Python code")
    p.add_argument("--method", default="hessian", choices=METHODS, help="sensitivity method (default hessian)")
    p.add_argument("--data", default="synthetic", metavar="BENCH_OR_DIR",
                   help="calibration benchmark: mmmu, seedbench, synthetic, or a local MMMU-schema copy (default synthetic)")
    p.add_argument("--split", default="dev", help="benchmark split (default dev: keep validation for evaluation)")
    p.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (fisher always uses 1)")
    p.add_argument("--seed", type=int, default=0, help="sample and probe seed (default 0)")
    p.add_argument("--space", default=None, help="search space file or shipped name (default: cpu, or gpu-bnb on cuda)")
    p.add_argument("--probes", type=int, default=16, help="hessian: Hutchinson probes at most (default 16)")
    p.add_argument("--tol", type=float, default=None, help="hessian: stop once every relative standard error is below")
    p.add_argument("--hvp", default="auto", choices=("auto", "hvp", "fd"),
                   help="hessian: double backward (eager attention), finite differences, or auto (default)")
    p.add_argument("--eps", type=float, default=None, help="hessian fd: relative step (default 1e-3 fp32, 1e-2 16-bit)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--placement", default="inline", choices=("inline", "first"),
                   help="images where their <image N> placeholders are, or all first")
    p.add_argument("-o", "--output", default="sens.json", help="report JSON (default sens.json)")
    p.add_argument("--plot", default=None, metavar="STEM", help="also write the heatmap STEM.png and STEM.svg")
    p.add_argument("--compare", nargs="+", default=None, metavar="REPORT",
                   help="another report to compare with (after profiling), or two reports without MODEL")
    p.add_argument("--top", type=int, default=5, help="how many most/least sensitive layers to print (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mpsearch.sensitivity import SensitivityReport

    if args.model is None:
        if not args.compare or len(args.compare) != 2:
            raise MpsError("profile: give MODEL to profile, or --compare A.json B.json to compare two reports")
        a, b = (SensitivityReport.from_json(p) for p in args.compare)
        print(comparison_text(a, b, args.compare[0], args.compare[1]))
        return 0
    if args.compare and len(args.compare) != 1:
        raise MpsError("profile MODEL --compare takes one report (the new one is compared with it)")
    if args.samples < 1 or args.batch_size < 1 or args.probes < 1:
        raise MpsError("profile: --samples, --batch-size and --probes must be >= 1")
    other = SensitivityReport.from_json(args.compare[0]) if args.compare else None  # fail before loading a model
    report = _profile(args)
    report.to_json(args.output)
    print(report.summary_text(top=args.top))
    print(f"wrote {args.output}")
    if args.plot:
        from mpsearch.plots import sensitivity_heatmap

        for path in sensitivity_heatmap(report, None, args.plot):
            print(f"wrote {path}")
    if other is not None:
        print(comparison_text(report, other, args.output, args.compare[0]))
    return 0


def _profile(args: argparse.Namespace) -> Any:
    from mpsearch._cli.common import load_model
    from mpsearch.models import discover_layers
    from mpsearch.sensitivity import profile
    from mpsearch.space import SearchSpace
    from mpsearch.tasks import load_benchmark

    device_type = str(args.device).split(":")[0]
    space = SearchSpace.from_yaml(args.space or ("gpu-bnb" if device_type == "cuda" else "cpu"), device=device_type)
    data = str(args.data)
    if data.lower() in BENCHMARK_NAMES:
        bench = load_benchmark(data, split=args.split)
    elif Path(data).exists():
        bench = load_benchmark("mmmu", split=args.split, path=data)
    else:
        raise MpsError(f"--data {data!r}: not a benchmark name ({', '.join(BENCHMARK_NAMES)}) nor an existing directory")
    model, processor = load_model(args)
    layers = discover_layers(model)
    config = ProfileConfig(method=args.method, n_samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                           n_probes=args.probes, tol=args.tol, hvp=args.hvp, eps=args.eps,
                           gradient_checkpointing=args.gradient_checkpointing, placement=args.placement,
                           model_name=args.model, progress=not args.quiet)
    return profile(model, processor, bench, layers, space, config=config)


def comparison_text(a: Any, b: Any, name_a: str = "a", name_b: str = "b") -> str:
    """Spearman rank agreement of two reports, overall, per group and per format, as a table."""
    from mpsearch.sensitivity import agreement

    table = agreement(a, b)
    fmts = [f for f in next(iter(table.values())) if f != "all"] if table else []
    head = f"{'group':<10} {'all':>7} " + " ".join(f"{f:>13}" for f in fmts)
    lines = [f"Spearman rank agreement: {name_a} ({a.method or '?'}) vs {name_b} ({b.method or '?'})",
             "  over common (layer, format) scores, pairs where both are 0 left out; n/a: fewer than 3 pairs",
             "  " + head]
    for group, row in table.items():
        cells = " ".join(f"{_num(row.get(f, math.nan)):>13}" for f in fmts)
        lines.append(f"  {group:<10} {_num(row['all']):>7} {cells}")
    return "\n".join(lines)


def _num(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"
