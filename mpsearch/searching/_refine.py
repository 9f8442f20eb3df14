"""``refine``: the second rung, an Optuna study on the real model seeded with the proxy front.

Every trial applies a policy to the model with a :class:`mpsearch.formats.ModuleBank` (each
layer quantized once into every candidate format before the study; a trial swaps modules,
never re-quantizes), measures the mean KL divergence of next-token distributions from the
full-precision model on calibration batches (the reference logits are computed once) and
times the whole model end to end on the device (:func:`mpsearch.latency.measure_model_latency`).
Objectives: ``kl`` and ``measured_latency_ms`` (plus ``memory_mb`` with a memory budget); the
budget is a constraint on the measured latency (and exact weight memory). A trial that runs
out of memory or gives a NaN/inf KL is recorded as FAILED with ``fail_reason`` and the study
goes on. Afterwards the fidelity of the proxy is reported: Spearman correlation of proxy loss
vs KL and of predicted vs measured latency over the trials, and the share of trial time spent
swapping modules.

Example:
    >>> refined = mps.refine(model, processor, front, "cpu", budget_ms=40.0, n_trials=30,
    ...                      bench=bench, lat=lat, sens=sens)                      # doctest: +SKIP
    >>> refined.meta["fidelity"]["spearman_proxy_kl"]                              # doctest: +SKIP
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import optuna

from mpsearch.hashing import bytes_key
from mpsearch.configs import RefineConfig
from mpsearch.errors import MpsError
from mpsearch.policy import Policy
from mpsearch.searching._front import Candidate, Front, pareto, read_front
from mpsearch.searching._ilp import BYTES_PER_MB, _mb_to_bytes
from mpsearch.searching._proxy import ProxyProblem
from mpsearch.searching._search import load_inputs, make_sampler
from mpsearch.searching._study import (
    TrialFailed,
    TrialOutcome,
    fingerprint,
    open_storage,
    open_study,
    retried_numbers,
    run_worker,
    storage_label,
    trial_failures,
)


def refine(
    model: Any,
    processor: Any,
    candidates: Any = None,
    space: Any = None,
    *rest: Any,
    bench: Any = None,
    batches: Sequence[Any] | None = None,
    calib: Any = None,
    lat: Any = None,
    sens: Any = None,
    layers: Sequence[Any] | None = None,
    config: RefineConfig | None = None,
    **settings: Any,
) -> Front:
    """Evaluate policies on the real model in an Optuna study; return the measured front.

    Settings come from ``config`` (:class:`mpsearch.configs.RefineConfig`); keywords named like
    its fields override them (``budget_ms=40.0``, ``n_trials=20``, ``workload=...``).

    Args:
        model, processor: the full-precision model (unquantized) and its processor.
        candidates: the proxy front (a list of :class:`Candidate` or policies, or a front
            file path); each becomes a seed trial.
        space: the search space (object, shipped name or YAML path).
        budget_ms: budget on the *measured* end-to-end latency; ``budget_mb`` on exact weight
            memory (MiB). None: no constraint.
        n_trials: the number of trials the study should hold in total (seeds included); a
            resumed study runs only what it lacks (as in :func:`mpsearch.search`).
        bench / batches / calib: calibration data: a benchmark (``n_samples`` rows drawn with
            ``seed`` are encoded) or ready batches (``calib`` takes either).
        workload: the :class:`mpsearch.Workload` timed per trial (default ``Workload()``).
        storage, study_name, seed, sampler: as in :func:`mpsearch.searching`.
        lat, sens: the latency table and sensitivity report (predicted latency, proxy loss and
            the fidelity report; the ``evo`` sampler needs them for its moves).
        eager: quantize every (layer, format) before the study (else on first use, cached).

    Positional arguments after ``processor`` are ``(candidates, space, budget_ms, n_trials)``;
    the order ``(calib, candidates, space, budget_ms, n_trials)`` is accepted too (recognised
    by the calibration data: a benchmark or a list of rows / batches).

    Returns:
        A :class:`Front` of feasible non-dominated candidates by (KL, measured latency), with
        ``failures`` (failed trials and reasons) and ``meta["fidelity"]``.

    Example:
        >>> refined = mps.refine(model, processor, front, space, budget_ms=40.0, n_trials=20, bench=bench)  # doctest: +SKIP
    """
    import torch

    from mpsearch.formats import ModuleBank
    from mpsearch.latency import Workload
    from mpsearch.models import discover_layers
    from mpsearch.sensitivity.kl import reference_logits

    if _is_calibration(candidates):  # refine(model, processor, calib, candidates, space, budget_ms, n_trials)
        calib = candidates if calib is None else calib
        candidates, space, rest = space, (rest[0] if rest else None), rest[1:]
    if len(rest) > 2:
        raise TypeError(f"refine() takes at most 6 positional arguments ({len(rest) + 4} given)")
    for key, value in zip(("budget_ms", "n_trials"), rest):
        if key in settings:
            raise TypeError(f"refine() got {key} both by position and by keyword")
        settings = {**settings, key: value}
    cfg = RefineConfig.resolve(config, settings, "refine")
    budget_ms, budget_mb, storage, study_name, seed = cfg.budget_ms, cfg.budget_mb, cfg.storage, cfg.study_name, cfg.seed
    sampler, workload, n_samples, batch_size, eager = cfg.sampler, cfg.workload, cfg.n_samples, cfg.batch_size, cfg.eager
    progress, timeout_s = cfg.progress, cfg.timeout_s
    n_trials = 50 if cfg.n_trials is None else int(cfg.n_trials)
    if space is None:
        raise MpsError("refine needs the search space (space=: an object, a shipped name or a YAML path)")
    sens, lat, space = load_inputs(sens, lat, space)
    cands = _candidates(candidates)
    layers = list(layers) if layers is not None else discover_layers(model)
    budget_bytes = _mb_to_bytes(budget_mb)
    if budget_ms is not None and not (isinstance(budget_ms, (int, float)) and math.isfinite(budget_ms) and budget_ms > 0):
        raise MpsError(f"budget_ms must be a positive number of milliseconds, got {budget_ms!r}")
    prob = ProxyProblem.build(sens if sens is not None else _zero_report(layers, space), lat, space, layers, model=model)
    workload = workload if workload is not None else Workload()
    batches = _batches(model, processor, bench, batches, calib, n_samples, batch_size, seed)

    seeds, seed_attrs, skipped = [], [], []
    for c in cands:
        try:
            idx = prob.indices(c.policy)
        except MpsError as exc:
            skipped.append(str(exc))
            continue
        params = prob.params(idx)
        if params not in seeds:
            seeds.append(params)
            seed_attrs.append({"seed": c.source or c.policy.label, "label": c.policy.label})
    if cands and not seeds:
        raise MpsError(f"none of the {len(cands)} candidates fits this model and search space: {skipped[0]}")

    objectives = ["kl", "measured_latency_ms"] + (["memory_mb"] if budget_bytes is not None else [])
    t0 = time.perf_counter()
    ref = reference_logits(model, batches)
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bank = ModuleBank(model, layers, space.formats())
    if eager:  # each layer into each of its candidate formats, once (not every format of the space)
        for l in layers:
            for f in space.candidates(l):
                bank.module(l.name, f)
    bank_s = time.perf_counter() - t0

    fp = fingerprint("refine", [(l.name, getattr(l, "in_features", 0), getattr(l, "out_features", 0)) for l in layers],
                     [(d.key, list(d.choices)) for d in prob.decisions], _batches_key(batches), budget_ms, budget_bytes,
                     objectives, workload.to_dict() if hasattr(workload, "to_dict") else str(workload))
    name = study_name or f"mpsearch-refine-{fp[:12]}-{sampler if isinstance(sampler, str) else 'custom'}-seed{seed}"
    smp = make_sampler(sampler, seed, prob, _pred_budget(budget_ms), budget_bytes, calibrate=True)
    study_attrs = {"mpsearch": {"stage": "refine", "space": prob.space_name, "budget_ms": budget_ms, "budget_mb": budget_mb,
                                "objectives": objectives, "decisions": prob.n, "calibration_rows": _rows(batches),
                                "workload": workload.to_dict() if hasattr(workload, "to_dict") else str(workload),
                                "seed": seed}}
    st = open_storage(storage)
    study, _ = open_study(st, name, ["minimize"] * len(objectives), smp, n_trials,
                          seeds=seeds, seed_attrs=seed_attrs, user_attrs=study_attrs, metric_names=objectives,
                          fingerprint_value=fp)
    st_label = storage_label(st, storage)

    def objective(trial: optuna.Trial) -> TrialOutcome:
        params = {prob.decisions[d].key: trial.suggest_categorical(prob.decisions[d].key, list(prob.decisions[d].choices))
                  for d in prob.free}
        idx = prob.from_params(params)
        return _measure(model, bank, batches, ref, workload, prob, idx, objectives, budget_ms, budget_bytes, sens is not None)

    t1 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            counts = run_worker(study, objective, storage=st, n_trials=n_trials, progress=progress, desc="refine",
                                timeout_s=timeout_s)
    finally:
        bank.restore()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    wall = time.perf_counter() - t1

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    out = [_candidate(prob, t, sens is not None, budget_ms, budget_bytes) for t in done]
    feasible = [c for c in out if c is not None]
    front = pareto(feasible, [o if o != "memory_mb" else "memory_bytes" for o in objectives])
    fidelity = fidelity_report(done, sens is not None, lat is not None)
    study.set_user_attr("fidelity", fidelity)
    meta = {
        "stage": "refine",
        "study_name": name,
        "storage": st_label,
        "sampler": sampler if isinstance(sampler, str) else type(sampler).__name__,
        "seed": seed,
        "n_trials": n_trials,
        "space": prob.space_name,
        "budget_ms": budget_ms,
        "budget_mb": budget_mb,
        "objectives": objectives,
        "workload": study_attrs["mpsearch"]["workload"],
        "calibration_rows": _rows(batches),
        "trials": {"total": len(trials) - len(retried_numbers(trials)), "complete": len(done),
                   "this_worker": counts["complete"] + counts["failed"], "failed": counts["failed"]},
        "seconds": {"reference_logits": round(ref_s, 3), "module_bank": round(bank_s, 3), "trials": round(wall, 3)},
        "seeds_skipped": skipped,
        "fidelity": fidelity,
    }
    return Front(front, meta=meta, failures=trial_failures(study))


# -- one trial ---------------------------------------------------------------------------------
def _measure(model: Any, bank: Any, batches: Any, ref: Any, workload: Any, prob: ProxyProblem, idx: list[int],
             objectives: list[str], budget_ms: float | None, budget_bytes: int | None, has_sens: bool) -> TrialOutcome:
    import torch

    from mpsearch.latency import measure_model_latency
    from mpsearch.sensitivity.kl import kl_to_reference

    policy = prob.policy(idx)
    try:
        t0 = time.perf_counter()
        bank.apply(policy)
        t1 = time.perf_counter()
        kl = float(kl_to_reference(model, batches, ref))
        t2 = time.perf_counter()
        if not math.isfinite(kl):
            raise TrialFailed(f"KL to the full-precision model is {kl} (non-finite outputs with {prob.summary(idx)})")
        timing = measure_model_latency(model, policy, workload)
        t3 = time.perf_counter()
    except TrialFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is a trial failure; anything else propagates
        if _is_oom(exc):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise TrialFailed(f"out of memory: {str(exc).splitlines()[0][:200]}") from None
        raise
    measured = float(getattr(timing, "median_ms", timing))
    if not math.isfinite(measured):
        raise TrialFailed(f"measured latency is {measured}")
    mem = prob.memory_bytes(idx)
    vals = {"kl": kl, "measured_latency_ms": measured, "memory_mb": None if mem is None else mem / BYTES_PER_MB}
    constraints = {}
    if budget_ms is not None:
        constraints["latency_ms"] = measured - float(budget_ms)
    if budget_bytes is not None:
        constraints["memory_mb"] = (float(mem) - float(budget_bytes)) / BYTES_PER_MB  # type: ignore[arg-type]
    attrs = {
        "kl": kl,
        "measured_latency_ms": measured,
        "latency_spread_ms": float(getattr(timing, "spread_ms", 0.0) or 0.0),
        "predicted_latency_ms": prob.latency_ms(idx) if prob.ms_tab is not None else None,
        "proxy_loss": prob.loss(idx) if has_sens else None,
        "memory_mb": vals["memory_mb"],
        "policy": prob.summary(idx),
        "formats": prob.group_counts(idx),
        "policy_key": policy.key(),
        "swap_s": round(t1 - t0, 6),
        "kl_s": round(t2 - t1, 6),
        "latency_s": round(t3 - t2, 6),
    }
    return TrialOutcome([float(vals[o]) for o in objectives], constraints, attrs)  # type: ignore[arg-type]


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and ("out of memory" in str(exc).lower() or isinstance(exc, MemoryError))


# -- results -----------------------------------------------------------------------------------
def _candidate(prob: ProxyProblem, t: optuna.trial.FrozenTrial, has_sens: bool, budget_ms: float | None,
               budget_bytes: int | None) -> Candidate | None:
    if any(float(v) > 0 for v in t.constraints.values()):
        return None
    try:
        idx = prob.from_params(t.params)
    except (MpsError, ValueError):
        return None
    loss, ms, mem = prob.evaluate(idx)
    src = t.user_attrs.get("seed") or f"refine trial {t.number}"
    policy = prob.policy(idx, label=f"refine #{t.number}", source="refine",
                         metrics={"kl": t.user_attrs.get("kl"), "measured_latency_ms": t.user_attrs.get("measured_latency_ms"),
                                  "predicted_latency_ms": ms, "proxy_loss": loss if has_sens else None, "memory_bytes": mem})
    return Candidate(policy, loss if has_sens else math.nan, ms, mem, str(src), kl=float(t.user_attrs["kl"]),
                     measured_latency_ms=float(t.user_attrs["measured_latency_ms"]), trial=t.number)


def fidelity_report(trials: Sequence[optuna.trial.FrozenTrial], has_sens: bool, has_lat: bool) -> dict[str, Any]:
    """Spearman correlations proxy loss vs KL and predicted vs measured latency, and the swap share.

    Example:
        >>> fidelity_report([], False, False)["n"]
        0
    """
    from scipy.stats import spearmanr

    def rho(a: list[float], b: list[float]) -> float | None:
        if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
            return None
        return float(spearmanr(a, b).statistic)

    ua = [t.user_attrs for t in trials]
    out: dict[str, Any] = {"n": len(ua)}
    if has_sens:
        out["spearman_proxy_kl"] = rho([u["proxy_loss"] for u in ua], [u["kl"] for u in ua])
    if has_lat:
        out["spearman_predicted_measured_latency"] = rho([u["predicted_latency_ms"] for u in ua], [u["measured_latency_ms"] for u in ua])
        errs = [abs(u["measured_latency_ms"] - u["predicted_latency_ms"]) / u["measured_latency_ms"] for u in ua if u.get("measured_latency_ms")]
        out["median_latency_error"] = float(sorted(errs)[len(errs) // 2]) if errs else None
    swap = sum(float(u.get("swap_s", 0.0)) for u in ua)
    total = sum(float(u.get("swap_s", 0.0)) + float(u.get("kl_s", 0.0)) + float(u.get("latency_s", 0.0)) for u in ua)
    out["swap_share"] = swap / total if total > 0 else None
    out["mean_trial_s"] = total / len(ua) if ua else None
    return out


# -- inputs --------------------------------------------------------------------------------------
def _is_calibration(x: Any) -> bool:
    """A benchmark, or a list of rows / encoded batches (candidates are never mappings)."""
    try:
        from mpsearch.tasks.base import Benchmark
    except ImportError:  # pragma: no cover
        Benchmark = ()  # type: ignore[assignment]
    if isinstance(x, Benchmark):  # type: ignore[arg-type]
        return True
    return isinstance(x, (list, tuple)) and bool(x) and isinstance(x[0], dict)


def _candidates(candidates: Any) -> list[Candidate]:
    if candidates is None:
        return []
    if isinstance(candidates, (str, Path)):
        return list(read_front(candidates))
    out = []
    for c in candidates:
        if isinstance(c, Candidate):
            out.append(c)
        elif isinstance(c, Policy):
            out.append(Candidate(c, math.nan, None, None, c.label))
        else:
            raise MpsError(f"refine: candidates must be Candidates or Policies, got {type(c).__name__}")
    return out


def _batches(model: Any, processor: Any, bench: Any, batches: Any, calib: Any, n_samples: int, batch_size: int, seed: int) -> list[Any]:
    if calib is not None:
        if isinstance(calib, (list, tuple)) and calib and isinstance(calib[0], dict) and "input_ids" in calib[0]:
            batches = calib
        else:
            bench = calib
    if batches is not None:
        out = list(batches)
    else:
        if bench is None:
            raise MpsError("refine needs calibration data: pass bench= (a benchmark) or batches=")
        from mpsearch.sensitivity.calib import calibration_batches

        out = calibration_batches(model, processor, bench, n_samples=n_samples, batch_size=batch_size, seed=seed)
    if not out:
        raise MpsError("refine: no calibration batches (empty benchmark split?)")
    return out


def _batches_key(batches: Sequence[Any]) -> str:
    return bytes_key(b["input_ids"].cpu().numpy().tobytes() for b in batches if b.get("input_ids") is not None)


def _rows(batches: Sequence[Any]) -> int:
    return int(sum(int(b["input_ids"].shape[0]) for b in batches if "input_ids" in b))


def _pred_budget(budget_ms: float | None) -> float | None:
    return budget_ms


def _zero_report(layers: Sequence[Any], space: Any) -> Any:
    from mpsearch.sensitivity.report import SensitivityReport

    return SensitivityReport({l.name: {f: 0.0 for f in space.candidates(l)} for l in layers}, method="none")
