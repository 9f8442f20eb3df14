"""``mpsearch run [CONFIG.yaml]``: the whole pipeline, the demo by default."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="profile -> latency -> search -> refine -> evaluate -> export -> plots",
        description="Run the whole pipeline. Without CONFIG it runs on the shipped demo model and synthetic "
                    "benchmark with the CPU search space and RunConfig's budget (memory: auto:2.5, the weight memory at "
                    "2.5 bits per weight; no latency budget). Finished stages are reused when rerun with the same inputs.")
    p.add_argument("config", nargs="?", default=None, help="run config YAML (mpsearch_run: 1); see examples/")
    p.add_argument("-o", "--out", default=None, help="output folder (default: the config's 'out', runs/demo)")
    p.add_argument("--budget-ms", type=float, default=None, help="latency budget in ms (overrides the config)")
    p.add_argument("--budget-mb", type=float, default=None, help="weight memory budget in MiB (overrides the config)")
    p.add_argument("--search-trials", type=int, default=None, help="proxy search trials (overrides the config)")
    p.add_argument("--refine-trials", type=int, default=None, help="refine trials on the real model (overrides the config)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N questions only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mpsearch.pipeline import RunConfig, run_pipeline

    cfg = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    for name in ("out", "budget_ms", "budget_mb", "search_trials", "refine_trials", "limit"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    cfg.validate("command line" if not args.config else args.config)
    summary = run_pipeline(cfg)
    print()
    print(summary.table())
    return 0
