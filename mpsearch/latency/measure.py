"""Measuring the per-layer latency table: pick a method, reuse the cache, combine phases, record how.

Two methods fill the table, both costing a number of timings that depends on the model's
*unique* layer shapes and the formats, not on its number of layers:

* ``method="context"`` (default without ``compile``): every Linear timed by hooks inside the
  real forward, pooled per unique key (:mod:`mpsearch.latency.context`);
* ``method="isolated"`` (used with ``compile``): each unique key timed alone
  (:mod:`mpsearch.latency.isolated`).

On a CPU with more than one thread configured, one forward is also timed at one thread and a
warning names both times when one thread wins (:mod:`mpsearch.latency.threads`); the thread
count used is in ``meta["threads"]`` and the provenance.

Example:
    >>> lat = measure_latency_table(model, layers, space, Workload(threads=1))  # doctest: +SKIP
    >>> lat.predict(policy), float(measure_model_latency(model, None, Workload()))  # doctest: +SKIP
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Sequence

from mpsearch.configs import LatencyConfig
from mpsearch.errors import MpsError
from mpsearch.latency.cache import table_cache_key
from mpsearch.latency.context import measure_context
from mpsearch.latency.isolated import measure_isolated
from mpsearch.latency.model_info import check_unquantized, layer_name
from mpsearch.latency.policies import random_policies
from mpsearch.latency.result import PhaseResult
from mpsearch.latency.runner import phases
from mpsearch.latency.table import LatencyTable, load_cached, store_cached
from mpsearch.latency.threads import check_threads
from mpsearch.latency.timing import fixed_threads
from mpsearch.latency.workload import Workload, describe_inputs, token_counts

METHODS = ("auto", "context", "isolated")
#: Seed of the mixed configurations the context method times (validation uses other seeds).
MIXED_SEED = 1_000_003


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr)


def resolve_method(method: str, workload: Workload) -> str:
    """``auto`` -> ``isolated`` with compile, else ``context``; refuses context with compile."""
    if method not in METHODS:
        raise MpsError(f"latency method {method!r}; valid: {', '.join(METHODS)}")
    if method == "auto":
        return "isolated" if workload.compile else "context"
    if method == "context" and workload.compile:
        raise MpsError("method 'context' times layers with forward hooks, which torch.compile does not keep; "
                       "use method 'isolated' (or 'auto') with a compiled workload")
    return method


def measure_latency_table(model: Any, layers: Sequence[Any], space: Any, workload: Workload | None = None,
                          *, config: LatencyConfig | None = None, log: Callable[[str], None] | None = None,
                          now: Callable[[], float] | None = None, **settings: Any) -> LatencyTable:
    """Measure ``base_ms`` and ``ms[layer][format]`` for every layer and candidate format of ``space``.

    Settings come from ``config`` (:class:`mpsearch.configs.LatencyConfig`); keywords named like
    its fields override them, and a positional ``workload`` overrides ``config.workload``.
    ``layers`` are :class:`mpsearch.models.Layer` objects (``discover_layers(model)``); the model
    must be in full precision and is left as it was found. See the module docstring for the
    ``context`` and ``isolated`` methods; ``mixed`` is the number of random policies of the space
    the context method runs besides the reference and the uniform ones (default: twice the number
    of formats), so that layers are also timed next to layers of other formats. With
    ``cache_dir``, a table measured under exactly the same key (device, dtype, threads, workload,
    method, layers, formats, library versions) is reused, and tables measured under another key
    are named and not used. ``check_thread_count``: warn when one thread beats the configured
    count (CPU). ``now`` (context method, CPU): a seconds counter replacing the clock.

    Example:
        >>> model, _ = load_vlm("tiny:llava")                                       # doctest: +SKIP
        >>> lat = measure_latency_table(model, discover_layers(model), SearchSpace.from_yaml("cpu"),
        ...                             Workload(threads=1))                        # doctest: +SKIP
        >>> round(lat.predict(Policy({}, default="torch.int8dyn")), 2)             # doctest: +SKIP
        3.1
    """
    cfg = LatencyConfig.resolve(config, settings, "measure_latency_table")
    workload = workload or cfg.workload or Workload()  # the positional workload wins over config's
    cache_dir, mixed, progress, check_thread_count = cfg.cache_dir, cfg.mixed, cfg.progress, cfg.check_thread_count
    log = log or _log_default
    method = resolve_method(cfg.method, workload)
    layers = list(layers)
    names = [layer_name(x) for x in layers]
    if len(set(names)) != len(names):
        raise MpsError("measure_latency_table: a layer is listed twice")
    ref = check_unquantized(model, names, "measure_latency_table")
    if hasattr(space, "check_device"):
        space.check_device(next(model.parameters()).device.type)
    cands = {n: list(space.candidates(x)) for n, x in zip(names, layers)}
    n_mixed = _n_mixed(cands, mixed)
    key = table_cache_key(model, layers, workload, method, cands)
    key["mixed"] = n_mixed if method == "context" else None
    if cache_dir is not None:
        cached = load_cached(cache_dir, key, log=log)
        if cached is not None:
            return cached
    mixes = _mixes(space, layers, names, n_mixed) if method == "context" else []
    start = time.perf_counter()
    results, threads, thread_check = _run_phases(model, names, cands, ref, workload, method, progress, mixes, log,
                                                 check_thread_count, now)
    base, ms = _combine(results, workload, names, cands)
    for _, r in results:
        for note in r.notes:
            log(f"latency: warning: {note}")
    meta = _table_meta(model, layers, workload, method, threads, results, key, time.perf_counter() - start, log)
    if thread_check is not None:
        meta["thread_check"] = thread_check
    table = LatencyTable(base, ms, meta)
    if cache_dir is not None:
        path = store_cached(cache_dir, key, table)
        log(f"latency cache: stored {path}")
    return table


def _n_mixed(cands: dict[str, list[str]], mixed: int | None) -> int:
    n_formats = len({f for c in cands.values() for f in c})
    n = (2 * n_formats if n_formats > 1 else 0) if mixed is None else int(mixed)
    if n < 0:
        raise MpsError(f"mixed must be >= 0, got {mixed}")
    return n


def _mixes(space: Any, layers: Sequence[Any], names: list[str], n: int) -> list[dict[str, str]]:
    return [p.resolve(names).formats for p in random_policies(space, layers, n, seed=MIXED_SEED)] if n else []


def _slots(model: Any, names: Sequence[str]) -> dict[str, tuple[int, int, bool]]:
    from mpsearch.models import get_module

    out = {}
    for n in names:
        m = get_module(model, n)
        out[n] = (int(m.in_features), int(m.out_features), getattr(m, "bias", None) is not None)
    return out


def _run_phases(model: Any, names: list[str], cands: dict[str, list[str]], ref: dict[str, str], workload: Workload,
                method: str, progress: bool, mixes: list[dict[str, str]], log: Callable[[str], None],
                check_thread_count: bool, now: Callable[[], float] | None
                ) -> tuple[list[tuple[str, PhaseResult]], int, dict[str, Any] | None]:
    slots = _slots(model, names)
    was_training = model.training
    model.eval()
    thread_check = None
    try:
        if check_thread_count and now is None:
            thread_check = check_threads(model, workload, log)
        with fixed_threads(workload.threads) as threads:
            results = []
            for phase in phases(workload):
                wp = workload.with_(phase=phase)
                if method == "context":
                    r = measure_context(model, slots, cands, ref, wp, phase, progress, mixes, now=now)
                else:
                    r = measure_isolated(model, slots, cands, ref, wp, phase, progress)
                results.append((phase, r))
    finally:
        model.train(was_training)
    return results, threads, thread_check


def _combine(results: list[tuple[str, PhaseResult]], workload: Workload, names: list[str],
             cands: dict[str, list[str]]) -> tuple[float, dict[str, dict[str, float]]]:
    if workload.phase != "both":
        return results[0][1].base_ms, results[0][1].ms
    (_, pre), (_, dec) = results
    n = workload.new_tokens
    ms = {l: {f: pre.ms[l][f] + n * dec.ms[l][f] for f in cands[l]} for l in names}
    return pre.base_ms + n * dec.base_ms, ms


def _observed(results: list[tuple[str, PhaseResult]], groups: dict[str, Any]) -> dict[str, dict[str, list[list[int]]]]:
    observed: dict[str, dict[str, list[list[int]]]] = {}
    for phase, r in results:
        by_group: dict[str, list[list[int]]] = {}
        for n, rows in r.rows.items():
            g = groups.get(n) or "?"
            if rows not in by_group.setdefault(g, []):
                by_group[g].append(rows)
        observed[phase] = by_group
    return observed


def _derived(model: Any, workload: Workload, results: list[tuple[str, PhaseResult]],
             observed: dict[str, dict[str, list[list[int]]]], log: Callable[[str], None]) -> dict[str, Any] | None:
    """Token counts from the config, compared with the rows the layers saw (a note where they differ)."""
    if workload.inputs is not None or workload.processor is not None:
        return None
    try:
        derived = {}
        for phase, _ in results:
            tc = token_counts(model, workload.with_(phase=phase))
            derived[phase] = tc.to_dict()
            for g, want in tc.per_group.items():
                seen = observed[phase].get(g)
                if seen is None:
                    continue
                flat = {sum(r) for r in seen}
                if flat != {want} and not (want == 0 and flat == {0}):
                    log(f"latency: note: {phase} {g} layers see {sorted(flat)} rows per call, the config "
                        f"derivation says {want}; the table uses the observed rows")
        return derived
    except MpsError as exc:
        return {"error": str(exc)}


def _table_meta(model: Any, layers: Sequence[Any], workload: Workload, method: str, threads: int,
                results: list[tuple[str, PhaseResult]], key: dict[str, Any], seconds: float,
                log: Callable[[str], None]) -> dict[str, Any]:
    from mpsearch.artifacts import provenance

    groups = {layer_name(x): getattr(x, "group", None) for x in layers}
    observed = _observed(results, groups)
    meta: dict[str, Any] = {
        "device": key["device"],
        "model": key["model"],
        "arch": key["arch"],
        "dtype": key["dtype"],
        "threads": threads,
        "workload": workload.to_dict(),
        "method": method,
        "stat": workload.stat,
        "unique_keys": {phase: r.keys for phase, r in results},
        "forward_passes": {phase: r.forwards for phase, r in results},
        "isolated_timings": {phase: r.isolated_timings for phase, r in results},
        "base_ms_by_phase": {phase: r.base_ms for phase, r in results},
        "fit": {phase: r.extra for phase, r in results if r.extra and method == "context"},
        "rows_observed": observed,
        "tokens_derived": _derived(model, workload, results, observed, log),
        "layer_groups": dict(groups),
        "seconds": round(seconds, 2),
        "cache_key": key,
        "cuda": key["cuda"],
    }
    compiled = {phase: r.extra["compile"] for phase, r in results if "compile" in r.extra}
    if compiled:
        meta["compile"] = compiled
    if workload.inputs is not None:
        meta["inputs"] = describe_inputs(workload.inputs)
    meta["provenance"] = provenance(device=key["device"], model=key["model"], dtype=key["dtype"], threads=threads,
                                    workload=workload.to_dict(), method=method, cuda=meta["cuda"])
    return meta


__all__ = ["measure_latency_table", "resolve_method", "METHODS", "MIXED_SEED"]
