"""``mpsearch plot``: the pictures of a run, from its artifacts."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot", help="Pareto front, sensitivity heatmap, bit allocation, predicted vs measured latency",
        description="Draw the plots of a run from its artifacts (PNG and SVG): the measured Pareto front "
                    "(latency and memory vs accuracy with Wilson intervals, KL, the proxy front), the "
                    "sensitivity heatmap, the bit allocation of a policy along depth and predicted vs "
                    "measured latency.")
    p.add_argument("results", nargs="?", default=None, help="results.jsonl (from `mpsearch evaluate` / `run`)")
    p.add_argument("--front", default=None, help="front.json of the proxy search (adds the proxy front panel)")
    p.add_argument("--sens", default=None, help="sensitivity report JSON (adds the heatmap)")
    p.add_argument("--policy", default=None, help="precision map YAML whose bit allocation to draw")
    p.add_argument("--model", default=None, help="model for the bit allocation's layers (default: the map's)")
    p.add_argument("--budget-ms", type=float, default=None, help="draw the latency budget")
    p.add_argument("--budget-mb", type=float, default=None, help="draw the memory budget")
    p.add_argument("-o", "--out", default="plots", help="output folder (default plots/)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpsearch import plots
    from mpsearch.errors import MpsError

    out = Path(args.out)
    written: list[Path] = []
    if not (args.results or args.sens or args.policy):
        raise MpsError("nothing to plot: give RESULTS.jsonl, --sens REPORT.json and/or --policy MAP.yaml")
    if args.results:
        from mpsearch.evaluation import read_results

        results = read_results(args.results)
        if not results:
            raise MpsError(f"{args.results}: no results to plot")
        front = None
        if args.front:
            from mpsearch.searching import read_front

            front = read_front(args.front)
        written += plots.pareto_front(results, out / "pareto", proxy_front=front, budget_ms=args.budget_ms,
                                      budget_mb=args.budget_mb)
        pairs = [(r.label, r.predicted_latency_ms, r.latency_ms) for r in results]
        if any(p is not None and m is not None for _, p, m in pairs):
            written += plots.predicted_vs_measured(pairs, out / "latency_fidelity")
    if args.sens:
        from mpsearch.sensitivity import SensitivityReport

        written += plots.sensitivity_heatmap(SensitivityReport.from_json(args.sens), None, out / "sensitivity")
    if args.policy:
        from mpsearch.models import discover_layers, load_vlm
        from mpsearch.policy import Policy

        policy = Policy.from_yaml(args.policy)
        model_name = args.model or policy.meta.get("model")
        if not model_name:
            raise MpsError(f"{args.policy}: the map names no model; pass --model")
        model, _ = load_vlm(model_name, load_processor=False)
        written += plots.bit_allocation(policy, discover_layers(model), out / "bits")
    for path in written:
        print(path)
    return 0
