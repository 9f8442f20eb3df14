"""``mpsearch export RESULTS.jsonl``: pick a policy from results and write its precision map.

With ``--to compressed-tensors`` (or ``--to torchao``) the input may also be a precision map
(``.yaml``), and the output is a checkpoint directory serving engines load
(:func:`mpsearch.export_checkpoint`) instead of a map.
"""
from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write the precision map of the best evaluated policy under a constraint",
        description="Pick a policy from evaluation results and write a fully expanded precision map YAML "
                    "with its measured metrics and provenance. Without a constraint: the most accurate.")
    p.add_argument("results", metavar="RESULTS_OR_MAP",
                   help="results.jsonl written by `mpsearch evaluate` or `mpsearch run`; with --to also a "
                        "precision map (.yaml)")
    g = p.add_argument_group("constraint (combine as needed)")
    g.add_argument("--best-under-ms", type=float, default=None, help="most accurate with measured latency <= ms")
    g.add_argument("--best-under-mb", type=float, default=None, help="most accurate with weight memory <= MiB")
    g.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="fastest whose accuracy is within this many points (0..100) of full precision")
    p.add_argument("--model", default=None, help="model to expand the map over (default: the one in the results)")
    p.add_argument("--benchmark", default=None, help="only results on this benchmark")
    p.add_argument("--mode", default=None, help="only results of this answer mode (logits/generate)")
    p.add_argument("-o", "--output", default=None,
                   help="precision map to write (default policy.yaml); with --to: the checkpoint directory")
    p.add_argument("--to", default=None, choices=["compressed-tensors", "torchao"],
                   help="write a checkpoint for serving engines instead of a map: compressed-tensors (vLLM, "
                        "transformers) or torchao (an FqnToConfig JSON); see `mpsearch.exportable_formats`")
    p.add_argument("--space", default=None, help="with --to: search space whose tie groups are checked "
                                                  "(default: the model's natural q/k/v and gate/up groups)")
    p.add_argument("--overwrite", action="store_true", help="with --to: replace an existing output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mpsearch.models import discover_layers, load_vlm
    from mpsearch.pipeline import export_result

    if args.to is not None:
        return _run_to(args)
    if args.output is None:
        args.output = "policy.yaml"

    chosen, prov, model_name = _best_result(args)
    model, _ = load_vlm(model_name, load_processor=False)
    export_result(chosen, args.output, discover_layers(model), model_name=model_name, revision=prov.get("revision"),
                  workload=prov.get("workload") or {}, device=prov.get("device") or "unknown",
                  extra_provenance={"results": str(args.results), "benchmark": f"{chosen.benchmark}/{chosen.split}"})
    latency = f"{chosen.latency_ms:.3f} ms" if chosen.latency_ms is not None else "latency not measured"
    print(f"{args.output}: {chosen.label}  accuracy {100 * chosen.accuracy:.2f}%  {latency}  "
          f"memory {(chosen.memory_bytes or 0) / 2**20:.3f} MiB")
    return 0


def _run_to(args: argparse.Namespace) -> int:
    """``--to FORMAT``: a precision map or the best result as a serving checkpoint."""
    from pathlib import Path

    from mpsearch.errors import MpsError
    from mpsearch.export import export_checkpoint
    from mpsearch.models import load_vlm
    from mpsearch.policy import Policy

    if not args.output:
        raise MpsError(f"--to {args.to} needs -o DIR, the checkpoint directory to write")
    source = Path(args.results)
    if source.suffix in (".yaml", ".yml"):
        policy = Policy.from_yaml(source)
        model_name = args.model or policy.meta.get("model")
        if not model_name:
            raise MpsError(f"{source}: the precision map names no model; pass --model")
    else:
        chosen, _, model_name = _best_result(args)
        policy = chosen.policy
    space = None
    if args.space:
        from mpsearch.space import SearchSpace

        space = SearchSpace.from_yaml(args.space)
    model, processor = load_vlm(model_name, load_processor=args.to == "compressed-tensors")
    out = export_checkpoint(model, policy, args.output, format=args.to, processor=processor, space=space,
                            overwrite=args.overwrite)
    print(f"{out}: {args.to} export of {model_name} ({policy.label})")
    return 0


def _best_result(args: argparse.Namespace) -> tuple[Any, dict, str]:
    """The result ``mpsearch export RESULTS`` picks (:func:`mpsearch.choice.choose`; the
    full-precision baseline first, since ``--max-accuracy-drop`` is measured from it), its
    record's provenance and its model name."""
    from mpsearch.artifacts import read_jsonl
    from mpsearch.errors import MpsError
    from mpsearch.evaluation import read_results
    from mpsearch.choice import choose

    results = read_results(args.results)
    records = read_jsonl(args.results)
    if args.benchmark:
        results = [r for r in results if r.benchmark == args.benchmark]
    if args.mode:
        results = [r for r in results if r.mode == args.mode]
    if not results:
        raise MpsError(f"{args.results}: no results" + (" match the filters" if args.benchmark or args.mode else ""))
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
    return chosen, prov, model_name
