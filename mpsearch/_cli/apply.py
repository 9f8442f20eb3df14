"""``mpsearch apply MODEL POLICY.yaml``: apply a precision map and report what changed."""
from __future__ import annotations

import argparse
import json

from mpsearch._cli.common import add_model_args, fmt_bytes, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply", help="apply a precision map to a model and print what changed",
                       description="Load MODEL, apply POLICY.yaml in place (real quantized modules) and print "
                                   "every module changed with its memory before and after.")
    add_model_args(p)
    p.add_argument("policy", help="precision map YAML (see `mpsearch export`)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mpsearch.formats import apply_policy
    from mpsearch.policy import Policy

    policy = Policy.from_yaml(args.policy)  # validate the file before loading a model
    model, _ = load_model(args)
    report = apply_policy(model, policy)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0
    print(report)
    print(f"weights of Linear layers: {fmt_bytes(report.bytes_before)} -> {fmt_bytes(report.bytes_after)}")
    return 0
