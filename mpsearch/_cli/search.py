"""``mpsearch search``: the proxy Pareto front under a budget (ILP optimum + Optuna study).

Example:
    $ mpsearch search --sens sens.json --latency latency.json --space cpu --budget-ms 40 -o front.json
    $ mpsearch search --sens sens.json --latency latency.json --space cpu --model demo --budget-mb 30 \\
          --n-trials 5000 --storage sqlite:///studies.db --study-name demo-40ms -o front.json
"""
from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``search`` subcommand to the ``mpsearch`` parser."""
    p = sub.add_parser(
        "search",
        help="search the proxy Pareto front under a latency/memory budget (ILP + Optuna)",
        description="Solve the exact optimum of the additive proxy (sum of sensitivity scores, latency table) under "
                    "the budget with an ILP, then run an Optuna study seeded with it (NSGA-II by default) and write the "
                    "feasible non-dominated candidates. With --storage the study survives restarts and kill -9 at any "
                    "moment: the same command resumes it (finished trials are kept, a killed worker's trial is retried "
                    "once), and several workers may run it at once.",
    )
    p.add_argument("--sens", "--sensitivity", dest="sens", required=True, help="sensitivity report (JSON, from `mpsearch profile`)")
    p.add_argument("--latency", default=None, help="latency table (JSON, from `mpsearch latency`); needed for --budget-ms")
    p.add_argument("--space", default=None,
                   help="search space: shipped name (cpu, gpu-bnb, gpu-ao, llm-only) or YAML file "
                        "(default: the one the report was profiled with)")
    p.add_argument("--model", default=None,
                   help="model whose layers are searched (also gives exact whole-model memory); default: the layers "
                        "listed in the sensitivity report, else placed in groups by their names")
    p.add_argument("--dtype", default=None, help="dtype to load --model in (memory of unsearched weights); default: the model's")
    p.add_argument("--budget-ms", type=float, default=None, help="latency budget in ms (LatencyTable.predict)")
    p.add_argument("--budget-mb", type=float, default=None, help="weight memory budget in MiB")
    p.add_argument("--n-trials", "--trials", dest="n_trials", type=int, default=2000,
                   help="the number of trials the study should hold in total, seeds included (default 2000): a new "
                        "study runs that many; rerunning the same command resumes it and runs only the trials it "
                        "lacks (plus unfinished seeds and retries of killed workers' trials), nothing if it already "
                        "holds as many; to add K trials pass the count it holds + K. Several workers at once may "
                        "end up to workers-1 trials above it")
    p.add_argument("--sampler", default="nsga2", choices=("nsga2", "tpe", "gp", "evo"),
                   help="nsga2 (default), tpe, gp, or evo (budget-keeping evolutionary moves)")
    p.add_argument("--seeding", default="ilp", choices=("ilp", "uniform", "none"),
                   help="seed the study with the ILP front and uniform policies (default), uniform ones only, or nothing")
    p.add_argument("--front-points", type=int, default=16, help="exact ILP front points under the budget used as seeds")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: sqlite:///study.db, journal:///study.log, postgresql://user:pw@host/db "
                        "(default: in memory)")
    p.add_argument("--study-name", "--study", dest="study_name", default=None,
                   help="study to create or resume (default: derived from the inputs)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--timeout-s", type=float, default=None, help="stop claiming new trials after this many seconds")
    p.add_argument("-o", "--output", required=True, help="write the front (JSON) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the inputs, search, print the front, write it."""
    import optuna

    from mpsearch.errors import MpsError
    from mpsearch.searching import search, write_front
    from mpsearch.sensitivity.report import SensitivityReport
    from mpsearch.space import SearchSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.budget_ms is None and args.budget_mb is None:
        raise MpsError("no budget: give --budget-ms (latency) and/or --budget-mb (weight memory)")
    if args.budget_ms is not None and args.latency is None:
        raise MpsError("--budget-ms needs --latency (a latency table from `mpsearch latency`)")
    sens = SensitivityReport.from_json(args.sens)
    lat = _load_latency(args.latency)
    space_name = args.space or (sens.meta or {}).get("search_space")
    if not space_name:
        raise MpsError(f"{args.sens}: the report does not name its search space; pass --space")
    space = SearchSpace.from_yaml(space_name)
    model = None
    if args.model:
        from mpsearch.models import load_vlm

        model, _ = load_vlm(args.model, dtype=args.dtype, load_processor=False)
    from mpsearch.configs import SearchConfig

    config = SearchConfig(budget_ms=args.budget_ms, budget_mb=args.budget_mb, n_trials=args.n_trials,
                          storage=args.storage, seed=args.seed, sampler=args.sampler, study_name=args.study_name,
                          front_points=args.front_points, seeding=args.seeding, progress=not args.no_progress,
                          timeout_s=args.timeout_s)
    front = search(sens, lat, space, model=model, config=config)
    _print(front)
    write_front(args.output, front, inputs={"sensitivity": str(args.sens), "latency": args.latency, "model": args.model},
                provenance={"search_space": space.name, "seed": args.seed, "sensitivity": sens.method})
    print(f"wrote {args.output} ({len(front)} candidates)")
    return 0


def _load_latency(path: str | None) -> Any:
    if path is None:
        return None
    from mpsearch.latency import LatencyTable

    return LatencyTable.from_json(path)


def _print(front: Any) -> None:
    m = front.meta
    ilp = m.get("ilp", {})
    budget = " and ".join(x for x in (f"{m['budget_ms']:g} ms" if m.get("budget_ms") is not None else "",
                                      f"{m['budget_mb']:g} MiB" if m.get("budget_mb") is not None else "") if x)
    print(f"space {m['space']}, budget {budget}: ILP optimum proxy loss {ilp.get('proxy_loss'):.6g}, "
          f"{_ms(ilp.get('predicted_latency_ms'))}, {_mib(ilp.get('memory_bytes'))} ({ilp.get('seconds')} s): {ilp.get('summary')}")
    t = m.get("trials", {})
    print(f"study {m['study_name']} ({m['storage']}, {m['sampler']}): {t.get('complete')} of {t.get('total')} trials complete, "
          f"{t.get('this_worker')} run here" + (f", {m['ms_per_trial']} ms/trial" if m.get("ms_per_trial") else ""))
    if not t.get("this_worker") and (t.get("total") or 0) >= (m.get("n_trials") or 0):
        print(f"the study already holds {t.get('total')} trials (--n-trials {m.get('n_trials')} is its total size): "
              f"nothing to run; pass a larger --n-trials to add trials")
    print(f"{'proxy loss':>12} {'pred. ms':>10} {'memory':>12}  source")
    for c in front:
        print(f"{c.proxy_loss:12.6g} {_ms(c.predicted_latency_ms):>10} {_mib(c.memory_bytes):>12}  {c.source}")
    if front.failures:
        print(f"{len(front.failures)} failed trial(s): " + "; ".join(f"#{f['trial']}: {f['reason']}" for f in front.failures[:5]))


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.4g} ms"


def _mib(v: Any) -> str:
    return "-" if v is None else f"{v / 2**20:.2f} MiB"
