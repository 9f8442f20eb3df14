"""``search``: the proxy Optuna study (thousands of policies a second), seeded by the ILP.

One categorical parameter per free decision (its choices fixed per name), objectives
``proxy_loss`` and ``predicted_latency_ms`` (and ``memory_mb`` with a memory budget or no
latency table), the budget set with ``Trial.set_constraint`` (``latency_ms`` = predicted -
budget, ``memory_mb`` likewise; feasible when <= 0). The study is seeded with the ILP optimum
at the budget, exact ILP front points under it and the uniform policies, and runs NSGA-II
(default), TPE, GP or :class:`BudgetSampler` (``"evo"``). The result is the feasible,
non-dominated set of everything evaluated, with the ILP point always in it.

Example:
    >>> front = mps.search(sens, lat, space, budget_ms=40.0, n_trials=500, model=model)  # doctest: +SKIP
    >>> front[0].policy, front[0].proxy_loss, front[0].predicted_latency_ms              # doctest: +SKIP
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna

from mpsearch.configs import SearchConfig
from mpsearch.errors import MpsError
from mpsearch.searching._front import Candidate, Front, pareto
from mpsearch.searching._ilp import BYTES_PER_MB, _check_budgets, _mb_to_bytes, candidate_of, problem_front, solve_problem
from mpsearch.searching._proxy import ProxyProblem, layers_from
from mpsearch.searching._sampler import BudgetSampler
from mpsearch.searching._study import (
    TrialOutcome,
    fingerprint,
    open_storage,
    open_study,
    retried_numbers,
    run_worker,
    storage_label,
    trial_failures,
)

SAMPLERS = ("nsga2", "tpe", "gp", "evo")
#: Candidate field of each objective name.
OBJECTIVE_FIELDS = {"proxy_loss": "proxy_loss", "predicted_latency_ms": "predicted_latency_ms", "memory_mb": "memory_bytes",
                    "kl": "kl", "measured_latency_ms": "measured_latency_ms"}


def resolve_layers(layers: Sequence[Any] | None, model: Any, sens: Any) -> list[Any]:
    """The layers to search: given, else discovered on ``model``, else listed in the report,
    else placed from the report's layer names by discover_layers' rule (a report from plain dicts).

    A report lists names and groups only (``meta["groups"]``): enough for latency budgets;
    memory needs layer shapes, i.e. the model.
    """
    if layers is not None:
        return layers_from(layers)
    if model is not None:
        from mpsearch.models import discover_layers

        return list(discover_layers(model))
    meta = getattr(sens, "meta", None) or {}
    if meta.get("layers"):
        return layers_from(meta["layers"])
    groups = meta.get("groups")
    if isinstance(groups, Mapping) and groups:
        scores = getattr(sens, "scores", {}) or {}
        order = list(scores) or list(groups)
        return layers_from({"name": str(n), "group": str(groups[n])} for n in order if n in groups)
    names = list(getattr(sens, "scores", None) or {})
    if names:  # a report from plain dicts: the names say their groups, by discover_layers' rule
        from mpsearch.models import layers_from_names

        return layers_from_names(names, owner="the sensitivity report", how=(
            "give the groups: pass the model (model=..., CLI --model), layers=[{'name': ..., 'group': ...}], "
            "or SensitivityReport(scores, meta={'groups': {layer: group}})"))
    raise MpsError("the layers to search are unknown: pass the model (--model) or a sensitivity report that lists its layers (meta.groups)")


def load_inputs(sens: Any, lat: Any, space: Any) -> tuple[Any, Any, Any]:
    """Accept paths / names for the report, the table and the space (API convenience)."""
    if isinstance(sens, (str, Path)):
        from mpsearch.sensitivity.report import SensitivityReport

        sens = SensitivityReport.from_json(sens)
    if isinstance(lat, (str, Path)):
        from mpsearch.latency import LatencyTable

        lat = LatencyTable.from_json(lat)
    if isinstance(space, (str, Path)):
        from mpsearch.space import SearchSpace

        space = SearchSpace.from_yaml(space)
    return sens, lat, space


def make_sampler(name: Any, seed: int, prob: ProxyProblem | None = None, budget_ms: float | None = None,
                 budget_bytes: int | None = None, calibrate: bool = False) -> optuna.samplers.BaseSampler:
    """``nsga2`` (default), ``tpe``, ``gp`` or ``evo`` (:class:`BudgetSampler`), seeded; or a sampler instance."""
    if isinstance(name, optuna.samplers.BaseSampler):
        return name
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "evo":
        if prob is None:
            raise MpsError("the evo sampler needs the proxy problem")
        return BudgetSampler(prob, budget_ms=budget_ms, budget_bytes=budget_bytes, seed=seed, calibrate=calibrate)
    raise MpsError(f"sampler {name!r} is not known; valid: {', '.join(SAMPLERS)}")


def search(
    sens: Any,
    lat: Any,
    space: Any,
    budget_ms: float | None = None,
    *,
    layers: Sequence[Any] | None = None,
    model: Any = None,
    config: SearchConfig | None = None,
    **settings: Any,
) -> Front:
    """Optuna search over the additive proxy; returns the feasible non-dominated candidates.

    Settings come from ``config`` (:class:`mpsearch.configs.SearchConfig`); keywords named like
    its fields override them (``n_trials=300``, ``storage=...``), and so does ``budget_ms`` given
    by position, as in :func:`solve_ilp`.

    Args:
        sens, lat, space: a SensitivityReport, a LatencyTable (None for memory-only budgets)
            and a SearchSpace (or paths / a shipped space name).
        budget_ms, budget_mb: latency budget (ms, ``LatencyTable.predict``) and/or weight
            memory budget (MiB); at least one.
        n_trials: the number of trials the study should hold in total (seeds included): a new
            study runs that many; a resumed one runs only what it lacks (plus its unfinished
            seeds and the retries of dead workers' trials) and nothing when it already holds as
            many. One worker gives exactly ``n_trials``; W workers at once at most W - 1 more.
        storage: None (in memory), an Optuna storage URL (``sqlite:///f.db``,
            ``journal:///f.log``, ``postgresql://...``) or storage object.
        seed: seeds the sampler; the same seed and inputs give the same front.
        sampler: ``nsga2`` (default), ``tpe``, ``gp``, ``evo`` or an Optuna sampler.
        study_name: the study to create or resume (default: derived from the inputs, so the
            same command resumes).
        layers, model: the layers searched (default: ``discover_layers(model)``, else the
            report's layer list); ``model`` also makes memory cover the whole model.
        front_points: exact ILP front points under the budget enqueued as seeds.
        seeding: ``ilp`` (default: the ILP optimum, ILP front points and the uniform
            policies seed the study, and ILP points are part of the result), ``uniform``
            (uniform policies only) or ``none`` (no seeds, no ILP: black-box search alone).
        timeout_s: stop claiming trials after this many seconds (the study can be resumed).

    Returns:
        A :class:`Front` (a list of :class:`Candidate`, sorted by proxy loss) with ``meta``
        (study, ILP optimum and time, trial counts, ms per trial) and ``failures``.

    Example:
        >>> front = mps.search(sens, lat, "cpu", budget_ms=40.0, n_trials=300, model=model)  # doctest: +SKIP
        >>> all(c.predicted_latency_ms <= 40.0 for c in front)                              # doctest: +SKIP
        True
    """
    if budget_ms is not None:
        settings = {**settings, "budget_ms": budget_ms}
    cfg = SearchConfig.resolve(config, settings, "search")
    budget_ms, budget_mb, n_trials, storage, seed = cfg.budget_ms, cfg.budget_mb, cfg.n_trials, cfg.storage, cfg.seed
    sampler, study_name, front_points, seeding = cfg.sampler, cfg.study_name, cfg.front_points, cfg.seeding
    progress, timeout_s = cfg.progress, cfg.timeout_s
    sens, lat, space = load_inputs(sens, lat, space)
    budget_bytes = _mb_to_bytes(budget_mb)
    layer_list = resolve_layers(layers, model, sens)
    space.searchable(layer_list)  # pins that leave nothing to search are an error, not an empty study
    prob = ProxyProblem.build(sens, lat, space, layer_list, model=model)
    _check_budgets(prob, budget_ms, budget_bytes, warn=True)

    if seeding not in ("ilp", "uniform", "none"):
        raise MpsError(f"seeding {seeding!r}: valid: ilp, uniform, none")
    t0 = time.perf_counter()
    ilp = candidate_of(prob, solve_problem(prob, budget_ms, budget_bytes, warn=False), "ilp",
                       budget_ms=budget_ms, budget_mb=budget_mb)
    ilp_s = time.perf_counter() - t0
    metric = "latency" if budget_ms is not None else "memory"
    ilp_pts = []
    if front_points and seeding == "ilp":
        ilp_pts = problem_front(prob, metric=metric, n_points=front_points, budget_ms=budget_ms, budget_bytes=budget_bytes)
    seeds = _seeds(prob, ilp, ilp_pts, space) if seeding != "none" else []
    if seeding == "uniform":
        seeds = [c for c in seeds if c.source.startswith("uniform")]

    objectives = objective_names(prob, budget_ms, budget_bytes)
    smp = make_sampler(sampler, seed, prob, budget_ms, budget_bytes)
    st = open_storage(storage)
    fp = fingerprint("search", [(d.key, list(d.choices)) for d in prob.decisions], [t.tolist() for t in prob.loss_tab],
                     None if prob.ms_tab is None else [t.tolist() for t in prob.ms_tab], prob.ms_offset,
                     None if prob.bytes_tab is None else [t.tolist() for t in prob.bytes_tab], prob.bytes_offset,
                     budget_ms, budget_bytes, objectives, seeding)
    name = study_name or f"mpsearch-search-{fp[:12]}-{_sampler_name(sampler)}-seed{seed}"
    study_attrs = {
        "mpsearch": {"stage": "search", "space": prob.space_name, "budget_ms": budget_ms, "budget_mb": budget_mb,
                     "decisions": prob.n, "free_decisions": len(prob.free), "layers": len(prob.layer_names),
                     "objectives": objectives, "sampler": _sampler_name(sampler), "seed": seed,
                     "memory_scope": prob.memory_scope},
        "ilp": {"proxy_loss": ilp.proxy_loss, "predicted_latency_ms": ilp.predicted_latency_ms,
                "memory_bytes": ilp.memory_bytes, "summary": prob.summary(prob.indices(ilp.policy)), "seconds": round(ilp_s, 4)},
    }
    study, _created = open_study(
        st, name, ["minimize"] * len(objectives), smp, n_trials,
        seeds=[prob.params(prob.indices(c.policy)) for c in seeds],
        seed_attrs=[{"seed": c.source, "label": c.policy.label} for c in seeds],
        user_attrs=study_attrs, metric_names=objectives, fingerprint_value=fp,
    )

    def objective(trial: optuna.Trial) -> TrialOutcome:
        params = {prob.decisions[d].key: trial.suggest_categorical(prob.decisions[d].key, list(prob.decisions[d].choices))
                  for d in prob.free}
        idx = prob.from_params(params)
        return proxy_outcome(prob, idx, objectives, budget_ms, budget_bytes)

    t1, c1 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        counts = run_worker(study, objective, storage=st, n_trials=n_trials, progress=progress, desc="search",
                            timeout_s=timeout_s)
    wall, cpu = time.perf_counter() - t1, time.process_time() - c1
    done = counts["complete"] + counts["failed"]

    cands = [ilp] + [c for c in ilp_pts if _fits(c, budget_ms, budget_bytes)] if seeding == "ilp" else []
    cands += trial_candidates(prob, study, budget_ms, budget_bytes, _sampler_name(sampler))
    front = pareto(cands, [OBJECTIVE_FIELDS[o] for o in objectives])
    trials = study.get_trials(deepcopy=False)
    meta = {
        "stage": "search",
        "study_name": name,
        "storage": storage_label(st, storage),
        "sampler": _sampler_name(sampler),
        "seed": seed,
        "n_trials": n_trials,
        "space": prob.space_name,
        "budget_ms": budget_ms,
        "budget_mb": budget_mb,
        "objectives": objectives,
        "seeding": seeding,
        "memory_scope": prob.memory_scope,
        "ilp": dict(study_attrs["ilp"]),
        "trials": {"total": len(trials) - len(retried_numbers(trials)),
                   "complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials),
                   "this_worker": done},
        "ms_per_trial": round(1000.0 * wall / done, 3) if done else None,
        "cpu_ms_per_trial": round(1000.0 * cpu / done, 3) if done else None,
        "sensitivity": getattr(sens, "method", None),
        "model": (getattr(sens, "meta", {}) or {}).get("model"),
        "device": getattr(lat, "device", None),
    }
    return Front(front, meta=meta, failures=trial_failures(study))


def objective_names(prob: ProxyProblem, budget_ms: float | None, budget_bytes: int | None) -> list[str]:
    """``proxy_loss`` plus the costs the study minimises."""
    out = ["proxy_loss"]
    if prob.ms_tab is not None:
        out.append("predicted_latency_ms")
    if prob.bytes_tab is not None and (budget_bytes is not None or prob.ms_tab is None):
        out.append("memory_mb")
    return out


def proxy_outcome(prob: ProxyProblem, idx: Sequence[int], objectives: Sequence[str], budget_ms: float | None,
                  budget_bytes: int | None) -> TrialOutcome:
    """Objective values, constraints and user attributes of one policy under the proxy."""
    loss, ms, mem = prob.evaluate(idx)
    vals = {"proxy_loss": loss, "predicted_latency_ms": ms, "memory_mb": None if mem is None else mem / BYTES_PER_MB}
    constraints = {}
    if budget_ms is not None:
        constraints["latency_ms"] = float(ms) - float(budget_ms)  # type: ignore[arg-type]
    if budget_bytes is not None:
        constraints["memory_mb"] = (float(mem) - float(budget_bytes)) / BYTES_PER_MB  # type: ignore[arg-type]
    # the objective values are shown under their metric names already; user attributes add
    # what optuna-dashboard cannot show otherwise (each one is a storage write)
    attrs: dict[str, Any] = {"policy": prob.summary(idx), "formats": prob.group_counts(idx)}
    for name, v in (("predicted_latency_ms", ms), ("memory_mb", vals["memory_mb"])):
        if name not in objectives and v is not None:
            attrs[name] = v
    return TrialOutcome([float(vals[o]) for o in objectives], constraints, attrs)  # type: ignore[arg-type]


def trial_candidates(prob: ProxyProblem, study: optuna.Study, budget_ms: float | None, budget_bytes: int | None,
                     sampler_name: str) -> list[Candidate]:
    """Feasible candidates of the study's complete trials, re-evaluated exactly from their parameters."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        try:
            idx = prob.from_params(t.params)
        except (MpsError, ValueError):
            continue
        src = t.user_attrs.get("seed") or f"trial {t.number} ({sampler_name})"
        c = candidate_of(prob, idx, str(src))
        c.trial = t.number
        if _fits(c, budget_ms, budget_bytes):
            out.append(c)
    return out


def _fits(c: Candidate, budget_ms: float | None, budget_bytes: int | None) -> bool:
    if budget_ms is not None and (c.predicted_latency_ms is None or c.predicted_latency_ms > budget_ms):
        return False
    if budget_bytes is not None and (c.memory_bytes is None or c.memory_bytes > budget_bytes):
        return False
    return True


def _seeds(prob: ProxyProblem, ilp: Candidate, pts: list[Candidate], space: Any) -> list[Candidate]:
    out, seen = [ilp], {ilp.key}
    for c in pts:
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    for p in space.uniform_policies(prob.layers):
        idx = prob.indices(p)
        if not any(len(prob.decisions[d].choices) > 1 and prob.decisions[d].choices[idx[d]] == p.meta["format"] for d in prob.free):
            continue  # no free decision takes this format: nothing uniform about it
        c = candidate_of(prob, idx, str(p.label))
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


def _sampler_name(sampler: Any) -> str:
    return sampler if isinstance(sampler, str) else type(sampler).__name__
