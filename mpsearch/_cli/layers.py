"""``mpsearch layers MODEL``: every linear layer of a VLM, its group, shape, parameters and tie group.

Example:
    $ mpsearch layers tiny:llava
    $ mpsearch layers OpenGVLab/InternVL2-2B --trust-remote-code --json
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

from mpsearch._cli.common import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``layers`` subcommand to the ``mpsearch`` parser."""
    p = sub.add_parser(
        "layers",
        help="list a model's linear layers by group (vision, projector, language, head)",
        description="Load MODEL (weights only, no processor) and print every linear layer: group, "
                    "in x out features, parameters (weight + bias) and tie group, then totals per group.",
    )
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print the layers and totals as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the layer table (or JSON) of ``args.model``; returns 0."""
    from mpsearch.models import discover_layers, group_summary, load_vlm, model_source

    model, _ = load_vlm(args.model, device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code, revision=args.revision, load_processor=False)
    layers = discover_layers(model)
    summary = group_summary(layers)
    if args.json:
        print(json.dumps(_as_json(model_source(model), type(model).__name__, layers, summary), indent=1))
    else:
        print(f"{model_source(model)} ({type(model).__name__}): {len(layers)} linear layers")
        print(_table(layers, summary))
    return 0


def _as_json(source: str, cls: str, layers: Sequence[Any], summary: dict[str, dict[str, int]]) -> dict[str, Any]:
    rows = [{"name": l.name, "group": l.group, "in_features": l.in_features, "out_features": l.out_features,
             "bias": l.bias, "params": l.params, "tie": l.tie, "depth": l.depth,
             "weight_tied_to": l.weight_tied_to} for l in layers]
    total = {"count": len(layers), "params": sum(l.params for l in layers)}
    return {"model": source, "class": cls, "layers": rows, "groups": summary, "total": total}


def _table(layers: Sequence[Any], summary: dict[str, dict[str, int]]) -> str:
    head = ("name", "group", "in x out", "params", "tie")
    rows = [(l.name, l.group, f"{l.in_features} x {l.out_features}", f"{l.params:,}",
             (l.tie or "-") + (f" (weight tied to {l.weight_tied_to})" if l.weight_tied_to else ""))
            for l in layers]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    fmt = "{:<%d}  {:<%d}  {:>%d}  {:>%d}  {}" % tuple(widths)
    lines = [fmt.format(*head), *(fmt.format(*r) for r in rows), "", "totals:"]
    gfmt = "  {:<10} {:>7} layers  {:>14} params"
    lines += [gfmt.format(g, s["count"], f"{s['params']:,}") for g, s in summary.items()]
    lines.append(gfmt.format("all", len(layers), f"{sum(l.params for l in layers):,}"))
    return "\n".join(lines)
