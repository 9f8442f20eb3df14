"""The context method: every Linear timed by hooks inside the real forward, pooled per unique key.

The real model runs the workload in several configurations (the reference; each format swapped
into every layer that may take it; ``mixed`` random policies of the space), swapped through a
:class:`mpsearch.formats.ModuleBank`, with forward hooks timing every Linear call *in context*
(neighbours evicting its weights and code from the caches, the real inputs, the real thread
pool). Times are pooled per unique key ``(in, out, bias, rows per call, format)``: all layers of
one key share one figure, so a model with twice the layers of the same shapes needs the same
number of forward passes. Each configuration is also timed end to end without hooks, in the
same interleaved rounds; least squares on ``end-to-end - sum of Linear times = base + sum_f
overhead_f * layers in f`` gives the base term and a per-format overhead outside the Linear
calls (added to each layer's entry; the reference format's is 0), so the table stays additive.

Example:
    >>> r = measure_context(model, slots, cands, ref, Workload(threads=1), "prefill", False)  # doctest: +SKIP
    >>> r.base_ms, r.ms["lm_head"]                                                            # doctest: +SKIP
"""
from __future__ import annotations

import math
import statistics
import sys
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

from mpsearch.latency.end_to_end import CHUNK
from mpsearch.latency.hooks import LayerClock, observe_rows
from mpsearch.latency.result import PhaseResult, stat, unique_key
from mpsearch.latency.runner import PhaseRunner
from mpsearch.latency.timing import is_cuda, time_callable
from mpsearch.latency.workload import Workload


def passes(names: Sequence[str], cands: dict[str, list[str]], ref: dict[str, str],
           mixed: Sequence[dict[str, str]] = ()) -> list[tuple[str, dict[str, str]]]:
    """The configurations run in context: the reference, each format wherever allowed, then the
    ``mixed`` ones (random policies of the space); duplicates are run once."""
    out = [("reference", dict(ref))]
    seen = {tuple(ref[n] for n in names)}
    formats: list[str] = []
    for n in names:
        for f in cands[n]:
            if f not in formats:
                formats.append(f)
    candidates = [(f"uniform {f}", {n: (f if f in cands[n] else ref[n]) for n in names}) for f in formats]
    candidates += [(f"mixed {i}", {n: m[n] for n in names}) for i, m in enumerate(mixed)]
    for label, mapping in candidates:
        sig = tuple(mapping[n] for n in names)
        if sig not in seen:
            seen.add(sig)
            out.append((label, mapping))
    return out


def fit_overheads(configs: Sequence[tuple[str, dict[str, str]]], rest_ms: Sequence[float], runs: dict[str, bool],
                  ref_formats: set[str]) -> tuple[float, dict[str, float], list[float]]:
    """Least squares ``rest(pass) = base + sum_f overhead_f * (layers in f that run)``.

    ``rest`` is a configuration's end-to-end time minus its Linear layers' in-context times:
    the work outside the Linear calls, which the formats around it slow down or speed up
    (caches, allocations). The reference format's overhead is 0 (it is in the base).
    Returns ``(base, {format: overhead per layer}, relative residuals)``.

    Example:
        >>> base, over, _ = fit_overheads([("reference", {"a": "fp32"}), ("u", {"a": "int8"})], [2.0, 2.5],
        ...                               {"a": True}, {"fp32"})
        >>> round(base, 6), {f: round(v, 6) for f, v in over.items()}
        (2.0, {'int8': 0.5})
    """
    import numpy as np

    formats = sorted({f for _, m in configs for n, f in m.items() if runs[n]} - ref_formats)
    X = np.array([[1.0] + [sum(1 for n, f in m.items() if runs[n] and f == g) for g in formats] for _, m in configs])
    y = np.array(rest_ms, dtype=float)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = (X @ coef - y) / np.maximum(np.abs(y), 1e-9)
    return float(coef[0]), {g: float(c) for g, c in zip(formats, coef[1:])}, [float(r) for r in resid]


def measure_context(model: Any, slots: dict[str, Any], cands: dict[str, list[str]], ref: dict[str, str],
                    workload: Workload, phase: str, progress: bool, mixed: Sequence[dict[str, str]] = (),
                    now: Callable[[], float] | None = None) -> PhaseResult:
    """In-context timing of one phase (see the module docstring), in interleaved rounds.

    ``slots`` maps each layer to ``(in, out, bias)``, ``cands`` to its candidate formats, ``ref``
    to its current (full-precision) format; ``now`` replaces the clock (a seconds counter).
    """
    from mpsearch.formats import ModuleBank

    names = list(slots)
    runner = PhaseRunner(model, workload, phase, now=now)
    rows = observe_rows(model, names, runner)
    runs = {n: bool(rows[n]) for n in names}
    configs = passes(names, cands, ref, mixed)
    bank = ModuleBank(model, names, sorted({f for _, m in configs for f in m.values()}))
    try:
        e2e, pooled, forwards = _rounds(model, names, slots, rows, ref, configs, bank, runner, workload, phase,
                                        progress, now)
    finally:
        bank.restore()
    key_ms = {k: stat(v, workload.stat) for k, v in pooled.items()}
    rest = [stat(e2e[i], workload.stat) - sum(key_ms[unique_key(slots[n], rows[n], m[n])] for n in names)
            for i, (_, m) in enumerate(configs)]
    base, overhead, resid = fit_overheads(configs, rest, runs, set(ref.values()))
    ms = {n: {f: key_ms[unique_key(slots[n], rows[n], f)] + (overhead.get(f, 0.0) if runs[n] else 0.0)
              for f in cands[n]} for n in names}
    notes = _clip_negative(ms, base, phase)
    extra = {"configurations": [label for label, _ in configs], "overhead_ms_per_layer": overhead,
             "rest_ms": dict(zip([label for label, _ in configs], rest)),
             "fit_residual_median": statistics.median(abs(x) for x in resid),
             "fit_residual_max": max(abs(x) for x in resid)}
    return PhaseResult(base, ms, rows, len(key_ms), forwards, 0, notes, extra)


def _rounds(model: Any, names: list[str], slots: dict[str, Any], rows: dict[str, list[int]], ref: dict[str, str],
            configs: list[tuple[str, dict[str, str]]], bank: Any, runner: PhaseRunner, workload: Workload,
            phase: str, progress: bool, now: Callable[[], float] | None
            ) -> tuple[list[list[float]], dict[tuple[Any, ...], list[float]], int]:
    """Interleaved rounds over the configurations: end-to-end samples, then hooked samples."""
    import torch

    from mpsearch.policy import Policy

    cuda = is_cuda(model)
    rounds = max(1, math.ceil(workload.repeats / CHUNK))
    per = max(1, math.ceil(workload.repeats / rounds))
    e2e: list[list[float]] = [[] for _ in configs]
    pooled: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    forwards = 0
    iterator: Iterable[int] = range(rounds)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"latency table ({phase}, {len(configs)} configurations)", unit="round",
                        file=sys.stderr)
    with torch.inference_mode():
        for r in iterator:
            warm = workload.warmup if r == 0 else 1
            for i, (_label, mapping) in enumerate(configs):
                bank.apply(Policy(mapping, default=ref[names[0]] if names else "fp32"))
                t = time_callable(runner.run, repeats=per, warmup=warm, device=model, reset=runner.reset,
                                  clock=workload.clock, now=now)
                e2e[i].extend(t.samples_ms)
                clock = LayerClock(model, names, cuda, clock=workload.clock, now=now)
                try:
                    for _ in range(per):
                        runner.run()
                        runner.reset()
                        times = clock.collect()
                        for n in names:
                            pooled[unique_key(slots[n], rows[n], mapping[n])].append(times[n])
                finally:
                    clock.remove()
                forwards += 2 * per + warm
    return e2e, pooled, forwards


def _clip_negative(ms: dict[str, dict[str, float]], base: float, phase: str) -> list[str]:
    notes = []
    if base < 0:
        notes.append(f"{phase}: base term came out negative ({base:.3f} ms): timing noise exceeds the non-Linear work")
    negative = sorted((n, f) for n, row in ms.items() for f, v in row.items() if v < 0)
    if negative:
        notes.append(f"{phase}: {len(negative)} layer entries came out negative after the overhead fit "
                     f"(e.g. {negative[0][0]} in {negative[0][1]}) and were set to 0: timing noise dominates "
                     "those layers; more repeats or a quieter machine help")
        for n, f in negative:
            ms[n][f] = 0.0
    return notes


__all__ = ["measure_context", "passes", "fit_overheads"]
