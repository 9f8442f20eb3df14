"""Search quality on a synthetic VLM-shaped instance: ILP vs Optuna samplers, seeded and not.

Prints, in one run: the ILP optimum and its solve time; for each sampler (NSGA-II, TPE, the
budget-keeping ``evo`` sampler), unseeded and seeded with the ILP front + uniform policies, the
best feasible proxy loss after each checkpoint (and the gap to the ILP optimum), the share of
feasible trials, ms per trial, and the hypervolume of the returned front relative to the exact
ILP front; then trials per second on SQLite and a journal file.

Usage:
    python benchmarks/search_quality.py                         # 1,000 trials, ~300 decisions
    python benchmarks/search_quality.py --trials 1000,5000 --tpe-trials 200 --json out.json
    python benchmarks/search_quality.py --only-refine --refine-model demo   # refine cost and fidelity
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import optuna  # noqa: E402

from mpsearch.searching import search  # noqa: E402
from mpsearch.searching._ilp import problem_front, solve_problem  # noqa: E402
from mpsearch.searching._proxy import ProxyProblem  # noqa: E402
from mpsearch.searching._study import open_storage  # noqa: E402
from mpsearch.searching.synthetic import synthetic_instance  # noqa: E402


def hypervolume_2d(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both minimised) inside the box below ``ref``.

    >>> hypervolume_2d([(1.0, 2.0), (2.0, 1.0)], (3.0, 3.0))
    3.0
    """
    stair: list[tuple[float, float]] = []
    for x, y in sorted((x, y) for x, y in points if x < ref[0] and y < ref[1]):
        if not stair or y < stair[-1][1]:
            stair.append((x, y))
    hv = 0.0
    for i, (x, y) in enumerate(stair):
        nx = stair[i + 1][0] if i + 1 < len(stair) else ref[0]
        hv += (nx - x) * (ref[1] - y)
    return hv


def run(args: argparse.Namespace) -> dict:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    inst = synthetic_instance(n_blocks=args.blocks, vision_blocks=args.vision_blocks, seed=args.seed)
    prob = ProxyProblem.build(inst.sens, inst.lat, inst.space, inst.layers)
    lo, hi = prob.latency_ms(prob.fastest()), prob.latency_ms(prob.slowest())
    budget = lo + args.budget_frac * (hi - lo)
    out: dict = {"decisions": prob.n, "free_decisions": len(prob.free), "layers": len(prob.layer_names),
                 "formats": inst.space.formats(), "budget_ms": budget, "fastest_ms": lo, "slowest_ms": hi}
    print(f"instance: {len(prob.layer_names)} layers, {prob.n} decisions ({len(prob.free)} free), formats "
          f"{', '.join(inst.space.formats())}; budget {budget:.3f} ms (fastest {lo:.3f}, slowest {hi:.3f})")

    t, c = time.perf_counter(), time.process_time()
    ilp_idx = solve_problem(prob, budget_ms=budget, warn=False)
    ilp_s, ilp_cpu = time.perf_counter() - t, time.process_time() - c
    out_cpu = {"ilp_cpu_s": ilp_cpu}
    ilp_loss = prob.loss(ilp_idx)
    t = time.perf_counter()
    exact = problem_front(prob, "latency", n_points=args.front_points, budget_ms=budget)
    front_s = time.perf_counter() - t
    ref = (max(c.proxy_loss for c in exact) * 1.1 + 1e-9, budget)
    hv_exact = hypervolume_2d([(c.proxy_loss, c.predicted_latency_ms) for c in exact], ref)
    out["ilp"] = {"loss": ilp_loss, "latency_ms": prob.latency_ms(ilp_idx), "seconds": ilp_s, **out_cpu,
                  "front_points": len(exact), "front_seconds": front_s}
    print(f"ILP (scipy.optimize.milp / HiGHS): optimum proxy loss {ilp_loss:.4f} at {prob.latency_ms(ilp_idx):.3f} ms "
          f"in {ilp_s:.2f} s ({ilp_cpu:.2f} s CPU); exact front: {len(exact)} points from {args.front_points} budgets in {front_s:.1f} s")

    checkpoints = [int(x) for x in args.trials.split(",")]
    n_max = max(checkpoints)
    n_min = min(checkpoints)  # seeded runs stop at the first checkpoint (they start at the optimum)
    configs = [("nsga2", "none", n_max), ("nsga2", "ilp", n_min), ("evo", "none", n_max), ("evo", "ilp", n_min)]
    if args.tpe_trials:
        configs.insert(2, ("tpe", "none", args.tpe_trials))
    out["runs"] = []
    print(f"\n{'sampler':<8} {'seeded':<7} {'trials':>6} " + " ".join(f"{'best@' + str(k):>12}" for k in checkpoints)
          + f" {'gap':>8} {'feasible':>9} {'ms/trial':>9} {'cpu ms':>7} {'HV/exact':>9}")
    for sampler, seeding, n in configs:
        st = open_storage(None)
        t = time.perf_counter()
        front = search(inst.sens, inst.lat, inst.space, budget_ms=budget, n_trials=n, storage=st, seed=args.seed,
                       sampler=sampler, layers=inst.layers, seeding=seeding, front_points=args.seed_points, progress=False)
        wall = time.perf_counter() - t
        cpu_ms = front.meta["cpu_ms_per_trial"]  # the trial loop alone (not the ILP solved inside search())
        study = optuna.load_study(study_name=front.meta["study_name"], storage=st)
        trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        feas = [tr for tr in trials if all(v <= 0 for v in tr.constraints.values())]
        own = [tr for tr in feas if "seed" not in tr.user_attrs]  # found by the sampler, not enqueued
        best = {}
        for k in checkpoints:
            vals = [tr.values[0] for tr in own if tr.number < k]
            best[k] = min(vals) if vals else math.inf
        hv = hypervolume_2d([(c.proxy_loss, c.predicted_latency_ms) for c in front], ref)
        final = min((tr.values[0] for tr in own), default=math.inf)
        gap = (final - ilp_loss) / ilp_loss if ilp_loss else math.nan
        row = {"sampler": sampler, "seeding": seeding, "trials": n, "best_by_sampler": best, "best_final": final, "gap_to_ilp": gap,
               "feasible_share": len(feas) / max(1, len(trials)), "ms_per_trial": front.meta["ms_per_trial"], "cpu_ms_per_trial": cpu_ms,
               "wall_s": wall, "front_size": len(front), "hv_ratio": hv / hv_exact if hv_exact else math.nan,
               "front_best": front[0].proxy_loss if front else math.inf}
        out["runs"].append(row)
        cells = " ".join(f"{best[k]:12.4f}" if k <= n else f"{'(' + str(n) + ')':>6}{final:6.1f}" for k in checkpoints)
        print(f"{sampler:<8} {seeding:<7} {n:>6} {cells} {gap:8.1%} {row['feasible_share']:9.1%} "
              f"{row['ms_per_trial']:9.1f} {cpu_ms:7.1f} {row['hv_ratio']:9.3f}")
    print("best@k: best feasible proxy loss among the sampler's own trials (seed trials excluded) in the first k;"
          " gap: best of all the sampler's own trials vs the ILP optimum; HV/exact: hypervolume of the returned front (seeds and ILP"
          " points included when seeded) over that of the exact ILP front points; ms/trial: wall clock, cpu ms: process"
          " CPU time per trial (the machine may be shared)")

    out["storage"] = []
    if args.storage_trials:
        print(f"\nstorage throughput (evo sampler, {args.storage_trials} trials, {len(prob.free)} parameters a trial):")
        with tempfile.TemporaryDirectory() as d:
            for label, url in (("memory", None), ("sqlite", f"sqlite:///{d}/s.db"), ("journal", f"journal:///{d}/s.log")):
                t = time.perf_counter()
                f = search(inst.sens, inst.lat, inst.space, budget_ms=budget, n_trials=args.storage_trials, storage=url,
                           study_name="throughput", sampler="evo", layers=inst.layers, front_points=0, progress=False)
                wall = time.perf_counter() - t
                cpu_ms = f.meta["cpu_ms_per_trial"]
                row = {"storage": label, "ms_per_trial": f.meta["ms_per_trial"], "cpu_ms_per_trial": cpu_ms,
                       "trials_per_s": 1000.0 / f.meta["ms_per_trial"], "wall_s": wall}
                out["storage"].append(row)
                print(f"  {label:<8} {row['ms_per_trial']:8.1f} ms/trial wall ({row['trials_per_s']:6.2f} trials/s), "
                      f"{cpu_ms:7.1f} ms/trial CPU")
    return out


def refine_cost(args: argparse.Namespace) -> dict:
    """The whole ladder on a real (small) model: profile, latency table, search, refine; print the
    refine stage's fidelity (Spearman proxy loss vs KL, predicted vs measured latency) and the
    share of trial time spent swapping modules."""
    import mpsearch as mps
    from mpsearch.searching._refine import refine
    from mpsearch.sensitivity.calib import calibration_batches

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    model, processor = mps.load_vlm(args.refine_model)
    layers = mps.discover_layers(model)
    space = mps.SearchSpace.from_yaml(args.refine_space)
    bench = mps.load_benchmark("synthetic", split="dev")
    batches = calibration_batches(model, processor, bench, n_samples=args.refine_samples, batch_size=4, seed=0)
    t = time.perf_counter()
    sens = mps.profile(model, processor, None, layers, space, method="activation", batches=batches, progress=False)
    prof_s = time.perf_counter() - t
    workload = mps.Workload(threads=1, clock="cpu", repeats=args.refine_repeats, warmup=2)
    t = time.perf_counter()
    lat = mps.measure_latency_table(model, layers, space, workload, progress=False)
    lat_s = time.perf_counter() - t
    prob = ProxyProblem.build(sens, lat, space, layers, model=model)
    lo, hi = prob.latency_ms(prob.fastest()), prob.latency_ms(prob.slowest())
    budget = lo + 0.5 * (hi - lo)
    front = search(sens, lat, space, budget_ms=budget, n_trials=200, sampler="evo", model=model, progress=False)
    t = time.perf_counter()
    refined = refine(model, processor, front, space, budget_ms=budget * 1.5, n_trials=args.refine_trials, batches=batches,
                     workload=workload, lat=lat, sens=sens, sampler="evo", progress=False)
    ref_s = time.perf_counter() - t
    fid = refined.meta["fidelity"]
    print(f"\nrefine on {args.refine_model} ({len(layers)} layers, space {space.name}, {refined.meta['calibration_rows']} "
          f"calibration rows, workload threads=1 clock=cpu repeats={args.refine_repeats}):")
    print(f"  profile (activation) {prof_s:.1f} s, latency table {lat_s:.1f} s, proxy budget {budget:.3f} ms, "
          f"proxy front {len(front)} candidates")
    print(f"  module bank {refined.meta['seconds']['module_bank']:.1f} s (once), reference logits "
          f"{refined.meta['seconds']['reference_logits']:.2f} s (once); {fid['n']} trials in {ref_s:.1f} s, "
          f"{fid['mean_trial_s'] * 1000:.0f} ms a trial of which swapping {fid['swap_share']:.1%}")
    print(f"  Spearman proxy loss vs KL {fid.get('spearman_proxy_kl')}, predicted vs measured latency "
          f"{fid.get('spearman_predicted_measured_latency')}, median latency error {fid.get('median_latency_error')}")
    print(f"  refined front: {len(refined)} candidates; failures: {len(refined.failures)}")
    return {"profile_s": prof_s, "latency_s": lat_s, "refine_s": ref_s, "fidelity": fid, "meta": refined.meta}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=48, help="language blocks (4 decisions each)")
    p.add_argument("--vision-blocks", type=int, default=26, help="vision blocks (4 decisions each)")
    p.add_argument("--budget-frac", type=float, default=0.3, help="budget = fastest + frac * (slowest - fastest)")
    p.add_argument("--trials", default="1000", help="checkpoints, comma separated; the largest is run")
    p.add_argument("--tpe-trials", type=int, default=200, help="TPE trials (slow per trial); 0 skips TPE")
    p.add_argument("--front-points", type=int, default=24, help="budgets of the exact ILP front (hypervolume reference)")
    p.add_argument("--seed-points", type=int, default=16, help="ILP front points enqueued as seeds")
    p.add_argument("--storage-trials", type=int, default=30, help="trials per storage in the throughput test; 0 skips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine-model", default=None, help="also run the ladder and refine on this model (e.g. demo)")
    p.add_argument("--refine-space", default="cpu")
    p.add_argument("--refine-trials", type=int, default=16)
    p.add_argument("--refine-samples", type=int, default=16)
    p.add_argument("--refine-repeats", type=int, default=10)
    p.add_argument("--only-refine", action="store_true", help="skip the synthetic search benchmark")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    out = {} if args.only_refine else run(args)
    if args.refine_model:
        out["refine"] = refine_cost(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
