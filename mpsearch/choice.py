"""Which evaluated result a run exports, and what the summary says about it.

:func:`choose` applies the rule (accuracy first; among results that cannot be told apart, the
fastest, then the smallest; never one that another result matches within ``tie_points`` while
being faster and no bigger), :func:`verdict` words it, :func:`pick_for_evaluation` spreads the
refined front's policies that evaluation re-measures. Plain data in (``Result`` objects), no
model, no I/O: ``mpsearch run`` (:mod:`mpsearch.pipeline`) and ``mpsearch export`` use it.

Example:
    >>> from types import SimpleNamespace as R
    >>> a = R(accuracy=0.90, accuracy_ci=(0.88, 0.92), latency_ms=10.0, memory_bytes=4, label="a")
    >>> b = R(accuracy=0.90, accuracy_ci=(0.88, 0.92), latency_ms=5.0, memory_bytes=4, label="b")
    >>> choose([a, b]).label
    'b'
"""
from __future__ import annotations

from typing import Any, Sequence

from mpsearch.errors import MpsError

__all__ = ["choose", "verdict", "pick_for_evaluation"]


def pick_for_evaluation(front: Sequence[Any], top_k: int) -> list[Any]:
    """Up to ``top_k`` policies spread along the front (by latency), labelled ``pareto-i``."""
    ranked = sorted(front, key=lambda c: (c.value("measured_latency_ms") if c.measured_latency_ms is not None
                                          else c.value("predicted_latency_ms")))
    if len(ranked) > top_k > 0:
        step = (len(ranked) - 1) / (top_k - 1) if top_k > 1 else 0
        ranked = [ranked[round(i * step)] for i in range(top_k)]
    elif top_k == 0:
        ranked = []
    out = []
    for i, c in enumerate(ranked):
        p = c.policy
        p.meta.setdefault("label", f"pareto-{i}")
        if p.meta["label"].startswith(("trial", "refine", "ilp front")):
            p.meta["label"] = f"pareto-{i}"
        out.append(p)
    return out


def choose(results: Sequence[Any], budget_ms: float | None = None, budget_mb: float | None = None,
           max_accuracy_drop: float | None = None, latency: str = "measured", tie_points: float = 0.5) -> Any:
    """Pick the result to export within the budgets: never one another result beats.

    1. Among the results that meet the budgets, the most accurate one, ``best``.
    2. Among those whose accuracy and ``best``'s lie within each other's 95 % interval (they
       cannot be told apart), the fastest, then the smallest.
    3. Never dominated: while another result meets the budgets, is as accurate within
       ``tie_points`` percentage points, no bigger and faster, take it instead. So no evaluated
       baseline that matches the export's accuracy is faster and no bigger.

    ``latency="measured"`` compares the budget with the end-to-end latency measured during
    evaluation, ``"predicted"`` with the latency table's prediction. With
    ``max_accuracy_drop`` (0..1), the fastest result whose accuracy is at least the
    full-precision accuracy (the first result) minus the drop. Raises :class:`MpsError` when
    nothing qualifies, naming the fastest result.

    Example:
        >>> best = choose(results, budget_mb=3.0)          # doctest: +SKIP
    """
    if not results:
        raise MpsError("no results to choose from")
    lat = _latency_of(latency)
    mem = lambda r: r.memory_bytes if r.memory_bytes is not None else float("inf")  # noqa: E731
    pool = list(results)
    if budget_ms is not None:
        pool = [r for r in pool if lat(r) <= budget_ms]
    if budget_mb is not None:
        pool = [r for r in pool if mem(r) <= budget_mb * 2**20]
    if max_accuracy_drop is not None:
        ref = results[0].accuracy
        pool = [r for r in pool if r.accuracy >= ref - max_accuracy_drop - 1e-12]
        if pool:
            return min(pool, key=lambda r: (lat(r), mem(r)))
    if not pool:
        fastest = min(results, key=lat)
        raise MpsError(f"no evaluated policy meets the constraint ({latency} latency); the fastest is "
                       f"{fastest.label!r} at {lat(fastest):.3f} ms, {(fastest.memory_bytes or 0) / 2**20:.3f} MiB")
    best = max(pool, key=lambda r: (r.accuracy, -lat(r), -mem(r)))
    close = [r for r in pool if _ci_high(r) >= best.accuracy - 1e-12 and r.accuracy >= _ci_low(best) - 1e-12]
    chosen = min(close, key=lambda r: (lat(r), mem(r), -r.accuracy))
    while True:
        better = [r for r in pool if r.accuracy >= chosen.accuracy - tie_points / 100 - 1e-12
                  and mem(r) <= mem(chosen) and lat(r) < lat(chosen)]
        if not better:
            return chosen
        chosen = min(better, key=lambda r: (lat(r), mem(r), -r.accuracy))


def _latency_of(latency: str) -> Any:
    """``result -> ms`` for ``"measured"`` (evaluation's end-to-end timing) or ``"predicted"``
    (the latency table); a result without that figure counts as infinitely slow."""
    field_ = "latency_ms" if latency == "measured" else "predicted_latency_ms"
    return lambda r: getattr(r, field_) if getattr(r, field_) is not None else float("inf")


def _ci_low(result: Any) -> float:
    ci = getattr(result, "accuracy_ci", None)
    return float(ci[0]) if ci else float(result.accuracy)


def _ci_high(result: Any) -> float:
    ci = getattr(result, "accuracy_ci", None)
    return float(ci[1]) if ci else float(result.accuracy)


def verdict(results: Sequence[Any], chosen: Any, latency: str = "measured") -> list[str]:
    """Plain sentences on the export: is it uniform, and how it compares with the uniform baselines.

    Example:
        >>> verdict(results, chosen)[0]      # doctest: +SKIP
        'exported pareto-1: 96.0% (perception 97.1%, reasoning 94.6%), 31.2 ms, 0.98 MiB'
    """
    lat = _latency_of(latency)
    skills = ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted((chosen.per_skill or {}).items()))
    lines = [f"exported {chosen.label}: {100 * chosen.accuracy:.1f}%" + (f" ({skills})" if skills else "")
             + f", {lat(chosen):.2f} ms, {(chosen.memory_bytes or 0) / 2**20:.3f} MiB"]
    uniform = chosen.baseline or bool(chosen.policy.meta.get("uniform"))
    searched = [r for r in results if not r.baseline and not r.policy.meta.get("uniform")]
    if uniform:
        lines.append(f"{chosen.label} is a uniform policy: it is as accurate as and faster than every searched "
                     f"policy under this budget ({len(searched)} searched policies evaluated), so it is what was exported")
        return lines
    for r in results:
        if not (r.baseline or r.policy.meta.get("uniform")) or r is chosen:
            continue
        if (r.memory_bytes or 0) <= (chosen.memory_bytes or 0) and lat(r) <= 1.1 * lat(chosen):
            lines.append(f"  vs {r.label} (no bigger, at most 10% slower): "
                         f"{100 * (chosen.accuracy - r.accuracy):+.1f} points")
    return lines
