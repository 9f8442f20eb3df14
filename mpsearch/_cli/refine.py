"""``mpsearch refine MODEL``: evaluate the proxy front on the real model (KL + measured latency).

Example:
    $ mpsearch refine demo --front front.json --space cpu --data synthetic --samples 16 \\
          --latency latency.json --sens sens.json --budget-ms 40 --n-trials 40 -o refined.json
    $ mpsearch refine OpenGVLab/InternVL2-2B --device cuda --dtype bfloat16 --front front.json \\
          --space gpu-ao --storage postgresql://u:pw@db/mps --study-name ivl-40ms --n-trials 200 -o refined.json
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``refine`` subcommand to the ``mpsearch`` parser."""
    from mpsearch._cli.common import add_model_args

    p = sub.add_parser(
        "refine",
        help="evaluate the proxy front on the real model (KL, measured latency) in an Optuna study",
        description="Seed an Optuna study with the proxy front; each trial swaps pre-quantized layers into MODEL, "
                    "measures the KL divergence to the full-precision model on calibration data and the end-to-end "
                    "latency on this device. Writes the measured Pareto front, the failed trials and the proxy's "
                    "fidelity (Spearman proxy loss vs KL, predicted vs measured latency).",
    )
    add_model_args(p)
    p.add_argument("--front", required=True, help="front file from `mpsearch search`")
    p.add_argument("--space", default=None, help="search space (default: the one the front was searched in)")
    p.add_argument("--data", default="synthetic", metavar="BENCH_OR_DIR", help="calibration data: benchmark name or local MMMU copy")
    p.add_argument("--split", default="dev", help="benchmark split (default dev)")
    p.add_argument("--samples", type=int, default=16, help="calibration samples (default 16)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration batch size (default 4)")
    p.add_argument("--latency", default=None, help="latency table: predicted latency per trial and the fidelity report")
    p.add_argument("--sens", "--sensitivity", dest="sens", default=None, help="sensitivity report: proxy loss per trial")
    p.add_argument("--workload", default="", help="key=value list timed per trial (see `mpsearch latency --help`)")
    p.add_argument("--budget-ms", type=float, default=None, help="budget on the measured latency (ms)")
    p.add_argument("--budget-mb", type=float, default=None, help="budget on weight memory (MiB)")
    p.add_argument("--n-trials", "--trials", dest="n_trials", type=int, default=50,
                   help="the number of trials the study should hold in total, seeds included (default 50); a resumed "
                        "study runs only the trials it lacks (see `mpsearch search --help`)")
    p.add_argument("--sampler", default="nsga2", choices=("nsga2", "tpe", "gp", "evo"), help="Optuna sampler (default nsga2)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (sqlite:///f.db, journal:///f.log, postgresql://...)")
    p.add_argument("--study-name", "--study", dest="study_name", default=None, help="study to create or resume")
    p.add_argument("--seed", type=int, default=0, help="sampler and calibration seed (default 0)")
    p.add_argument("--lazy-bank", action="store_true", help="quantize layers on first use instead of all before the study")
    p.add_argument("--timeout-s", type=float, default=None, help="stop claiming new trials after this many seconds")
    p.add_argument("-o", "--output", required=True, help="write the refined front (JSON) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load everything, refine, print, write."""
    import optuna

    from mpsearch._cli.common import load_model
    from mpsearch.errors import MpsError
    from mpsearch.latency import LatencyTable, Workload
    from mpsearch.searching import read_front, write_front
    from mpsearch.searching._refine import refine
    from mpsearch.sensitivity.report import SensitivityReport
    from mpsearch.space import SearchSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    front = read_front(args.front)
    if not front:
        raise MpsError(f"{args.front}: the front has no candidates")
    space_name = args.space or front.meta.get("space")
    if not space_name:
        raise MpsError(f"{args.front}: the front does not name its search space; pass --space")
    space = SearchSpace.from_yaml(space_name, device=str(args.device).split(":")[0])
    workload = Workload.parse(args.workload)
    lat = LatencyTable.from_json(args.latency) if args.latency else None
    sens = SensitivityReport.from_json(args.sens) if args.sens else None
    bench = _bench(args.data, args.split)
    model, processor = load_model(args)
    from mpsearch.configs import RefineConfig

    config = RefineConfig(budget_ms=args.budget_ms, budget_mb=args.budget_mb, n_trials=args.n_trials,
                          storage=args.storage, study_name=args.study_name, seed=args.seed, sampler=args.sampler,
                          workload=workload, n_samples=args.samples, batch_size=args.batch_size,
                          eager=not args.lazy_bank, progress=not args.no_progress, timeout_s=args.timeout_s)
    refined = refine(model, processor, list(front), space, bench=bench, lat=lat, sens=sens, config=config)
    _print(refined)
    write_front(args.output, refined, model=args.model,
                inputs={"front": str(args.front), "latency": args.latency, "sensitivity": args.sens, "data": args.data,
                        "split": args.split},
                provenance={"search_space": space.name, "seed": args.seed, "device": _device(model)})
    print(f"wrote {args.output} ({len(refined)} candidates)")
    return 0


def _bench(data: str, split: str) -> Any:
    from mpsearch.errors import MpsError
    from mpsearch.tasks import BENCHMARKS, load_benchmark

    if data.lower() in BENCHMARKS:
        return load_benchmark(data.lower(), split=split)
    if Path(data).exists():
        return load_benchmark("mmmu", split=split, path=data)
    raise MpsError(f"--data {data!r}: not a benchmark name ({', '.join(BENCHMARKS)}) nor an existing directory")


def _device(model: Any) -> str:
    from mpsearch.artifacts import device_name

    try:
        return device_name(next(model.parameters()).device)
    except StopIteration:  # pragma: no cover
        return device_name()


def _print(front: Any) -> None:
    m = front.meta
    t = m["trials"]
    print(f"study {m['study_name']} ({m['storage']}): {t['complete']} of {t['total']} trials complete, {t['this_worker']} run here, "
          f"{t['failed']} failed here")
    f = m["fidelity"]
    parts = [f"{f['n']} trials"]
    for key, label in (("spearman_proxy_kl", "Spearman proxy loss vs KL"),
                       ("spearman_predicted_measured_latency", "Spearman predicted vs measured latency"),
                       ("median_latency_error", "median latency error"), ("swap_share", "swap share of trial time")):
        if f.get(key) is not None:
            parts.append(f"{label} {f[key]:.3f}")
    print("fidelity: " + ", ".join(parts))
    print(f"{'KL':>12} {'measured':>12} {'predicted':>12} {'memory':>12}  source")
    for c in front:
        pred = "-" if c.predicted_latency_ms is None else f"{c.predicted_latency_ms:.4g} ms"
        mem = "-" if c.memory_bytes is None else f"{c.memory_bytes / 2**20:.2f} MiB"
        print(f"{c.kl:12.5g} {c.measured_latency_ms:9.4g} ms {pred:>12} {mem:>12}  {c.source}")
    if front.failures:
        print(f"{len(front.failures)} failed trial(s):")
        for fl in front.failures:
            print(f"  #{fl['trial']}: {fl['reason']}")
