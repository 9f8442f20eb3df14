"""``mpsearch export RESULTS.jsonl``: pick a policy from results and write its precision map."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write the precision map of the best evaluated policy under a constraint",
        description="Pick a policy from evaluation results and write a fully expanded precision map YAML "
                    "with its measured metrics and provenance. Without a constraint: the most accurate.")
    p.add_argument("results", help="results.jsonl written by `mpsearch evaluate` or `mpsearch run`")
    g = p.add_argument_group("constraint (combine as needed)")
    g.add_argument("--best-under-ms", type=float, default=None, help="most accurate with measured latency <= ms")
    g.add_argument("--best-under-mb", type=float, default=None, help="most accurate with weight memory <= MiB")
    g.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="fastest whose accuracy is within this many points (0..100) of full precision")
    p.add_argument("--model", default=None, help="model to expand the map over (default: the one in the results)")
    p.add_argument("--benchmark", default=None, help="only results on this benchmark")
    p.add_argument("--mode", default=None, help="only results of this answer mode (logits/generate)")
    p.add_argument("-o", "--output", default="policy.yaml", help="precision map to write (default policy.yaml)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mpsearch.artifacts import read_jsonl
    from mpsearch.errors import MpsError
    from mpsearch.evaluation import read_results
    from mpsearch.models import discover_layers, load_vlm
    from mpsearch.pipeline import choose, export_result

    results = read_results(args.results)
    records = read_jsonl(args.results)
    if args.benchmark:
        results = [r for r in results if r.benchmark == args.benchmark]
    if args.mode:
        results = [r for r in results if r.mode == args.mode]
    if not results:
        raise MpsError(f"{args.results}: no results" + (" match the filters" if args.benchmark or args.mode else ""))
    # the full-precision baseline first: --max-accuracy-drop is measured from it
    ordered = [r for r in results if r.baseline] + [r for r in results if not r.baseline]
    if args.max_accuracy_drop is not None and not ordered[0].baseline:
        raise MpsError(f"{args.results}: no full-precision baseline result to measure the accuracy drop from")
    drop = args.max_accuracy_drop / 100.0 if args.max_accuracy_drop is not None else None
    chosen = choose(ordered, budget_ms=args.best_under_ms, budget_mb=args.best_under_mb, max_accuracy_drop=drop)
    prov = next((r.get("provenance", {}) for r in records
                 if r.get("result", {}).get("policy_key") == chosen.policy.key()), {})
    model_name = args.model or prov.get("model")
    if not model_name:
        raise MpsError(f"{args.results}: the results do not name their model; pass --model")
    model, _ = load_vlm(model_name, load_processor=False)
    export_result(chosen, args.output, discover_layers(model), model_name=model_name, revision=prov.get("revision"),
                  workload=prov.get("workload") or {}, device=prov.get("device") or "unknown",
                  extra_provenance={"results": str(args.results), "benchmark": f"{chosen.benchmark}/{chosen.split}"})
    latency = f"{chosen.latency_ms:.3f} ms" if chosen.latency_ms is not None else "latency not measured"
    print(f"{args.output}: {chosen.label}  accuracy {100 * chosen.accuracy:.2f}%  {latency}  "
          f"memory {(chosen.memory_bytes or 0) / 2**20:.3f} MiB")
    return 0
