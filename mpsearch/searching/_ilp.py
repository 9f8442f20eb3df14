"""Exact optimum of the additive proxy under a budget: an ILP solved by ``scipy.optimize.milp``.

One binary per (decision, format); one-hot rows (each decision takes exactly one format);
budget rows ``sum(ms) <= budget_ms - offset`` and/or ``sum(bytes) <= budget - offset``.
The optimum is lexicographic: least summed sensitivity; then, among the policies within the
solver's tolerance of that loss (:func:`loss_tolerance`), least latency; then, among those
within tolerance of that latency, least memory (a second and third solve, each with the earlier
objectives capped at optimum + tolerance; ``ilp_front`` on memory swaps the last two). So no
ILP point is beaten on every objective by a policy that meets the same budgets. HiGHS runs with
``mip_rel_gap=0`` and the solution is re-checked in exact arithmetic: it never exceeds the
budget (a tolerance-level violation tightens the row and solves again).

Example:
    >>> policy = solve_ilp(sens, lat, space, budget_ms=40.0, model=model)   # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from typing import Any, Iterator, Sequence

import numpy as np

from mpsearch.errors import InfeasibleBudget, MpsError
from mpsearch.policy import Policy
from mpsearch.searching._front import Candidate
from mpsearch.searching._proxy import ProxyProblem

#: Bytes in one MB of ``budget_mb`` (MiB: 2**20).
BYTES_PER_MB = 2**20
_OBJ_SCALE = 1e3  # largest objective coefficient (HiGHS's absolute MIP gap is 1e-6)
_ROW_SCALE = 1.0  # largest coefficient of a budget row (the one-hot rows have 1)
_MAX_TIGHTEN = 8
#: Tie tolerance, relative to the largest coefficient of an objective: HiGHS's primal feasibility
#: and integrality tolerances (1e-7, 1e-6 on rows and variables scaled to 1) make values closer
#: than this indistinguishable to it.
TIE_RTOL = 1e-6
_ORDER = {"latency": ("latency", "memory"), "memory": ("memory", "latency")}


def solve_ilp(
    sens: Any,
    lat: Any,
    space: Any,
    budget_ms: float | None = None,
    budget_mb: float | None = None,
    layers: Sequence[Any] | None = None,
    model: Any = None,
) -> Policy:
    """The policy of least summed sensitivity within the budget(s): the exact additive optimum.

    ``budget_ms`` bounds ``LatencyTable.predict``; ``budget_mb`` (MiB) bounds the exact weight
    memory (of the whole model when ``model`` is given, else of its Linear layers). Layers come
    from ``layers``, else ``discover_layers(model)``, else the report's layer list. A budget no
    policy meets raises :class:`InfeasibleBudget` stating the fastest and smallest policies;
    a budget above the slowest policy warns that it constrains nothing.

    Example:
        >>> p = mps.solve_ilp(sens, lat, space, budget_ms=40.0, model=model)  # doctest: +SKIP
        >>> p.meta["metrics"]["predicted_latency_ms"] <= 40.0                  # doctest: +SKIP
        True
    """
    from mpsearch.searching._search import resolve_layers

    prob = ProxyProblem.build(sens, lat, space, resolve_layers(layers, model, sens), model=model)
    idx = solve_problem(prob, budget_ms=budget_ms, budget_bytes=_mb_to_bytes(budget_mb))
    return candidate_of(prob, idx, "ilp", budget_ms=budget_ms, budget_mb=budget_mb).policy


def ilp_front(
    sens: Any,
    lat: Any,
    space: Any,
    layers: Sequence[Any] | None = None,
    model: Any = None,
    metric: str = "latency",
    n_points: int | None = 24,
    budget_ms: float | None = None,
    budget_mb: float | None = None,
) -> list[Candidate]:
    """Exact Pareto points of the additive proxy (loss vs latency, or vs memory).

    ``n_points`` budgets evenly spaced between the cheapest and the most expensive policy
    (capped by the other budget if given) are each solved exactly; ``n_points=None`` walks the
    whole front (epsilon-constraint: every Pareto-optimal cost level; small spaces only).

    Example:
        >>> pts = ilp_front(sens, lat, space, model=model, n_points=10)      # doctest: +SKIP
        >>> [round(c.predicted_latency_ms, 1) for c in pts]                   # doctest: +SKIP
    """
    from mpsearch.searching._search import resolve_layers

    prob = ProxyProblem.build(sens, lat, space, resolve_layers(layers, model, sens), model=model)
    return problem_front(prob, metric=metric, n_points=n_points, budget_ms=budget_ms, budget_bytes=_mb_to_bytes(budget_mb))


# -- on a ProxyProblem --------------------------------------------------------------------
def candidate_of(prob: ProxyProblem, idx: Sequence[int], source: str, **meta: Any) -> Candidate:
    """A :class:`Candidate` (with the policy's metrics in ``policy.meta``) of a choice vector."""
    loss, ms, mem = prob.evaluate(idx)
    metrics = {"proxy_loss": loss, "predicted_latency_ms": ms, "memory_bytes": mem}
    label = source if "budget_ms" not in meta or meta["budget_ms"] is None else f"{source} @ {meta['budget_ms']:g} ms"
    pmeta = {"label": label, "source": source, "metrics": metrics}
    pmeta.update({k: v for k, v in meta.items() if v is not None})
    return Candidate(prob.policy(idx, **pmeta), loss, ms, mem, source)


def solve_problem(
    prob: ProxyProblem,
    budget_ms: float | None = None,
    budget_bytes: int | None = None,
    warn: bool = True,
) -> list[int]:
    """Choice vector minimising the loss within the budgets (lexicographically: then the cost).

    Raises :class:`InfeasibleBudget` when nothing fits.
    """
    _check_budgets(prob, budget_ms, budget_bytes, warn)
    idx = _milp(prob, budget_ms, budget_bytes)
    if idx is None:
        raise InfeasibleBudget(_infeasible_message(prob, budget_ms, budget_bytes, joint=True))
    return idx


def problem_front(
    prob: ProxyProblem,
    metric: str = "latency",
    n_points: int | None = 24,
    budget_ms: float | None = None,
    budget_bytes: int | None = None,
    max_points: int = 100_000,
) -> list[Candidate]:
    """Exact Pareto points of ``prob`` (see :func:`ilp_front`), sorted by cost."""
    if metric not in ("latency", "memory"):
        raise MpsError(f"ilp front metric {metric!r}: valid: latency, memory")
    cost = prob.latency_ms if metric == "latency" else prob.memory_bytes
    lo_idx = prob.fastest() if metric == "latency" else prob.smallest()
    other_ms = budget_ms if metric == "memory" else None
    other_b = budget_bytes if metric == "latency" else None
    cap = budget_ms if metric == "latency" else budget_bytes
    lo = float(cost(lo_idx))  # type: ignore[arg-type]
    hi_idx = _milp(prob, other_ms, other_b, order=_ORDER[metric])
    if hi_idx is None:
        raise InfeasibleBudget(_infeasible_message(prob, budget_ms, budget_bytes, joint=True))
    hi = float(cost(hi_idx))  # type: ignore[arg-type]
    if cap is not None:
        if cap < lo:
            raise InfeasibleBudget(_infeasible_message(prob, budget_ms, budget_bytes, joint=False))
        hi = min(hi, float(cap))
    points: dict[tuple[int, ...], list[int]] = {}
    kw = {"budget_ms": other_ms, "budget_bytes": other_b}
    if n_points is None:
        b = hi
        while len(points) < max_points:
            idx = _milp(prob, **_with_cost(kw, metric, b), order=_ORDER[metric])
            if idx is None:
                break
            points[tuple(idx)] = idx
            c = float(cost(idx))  # type: ignore[arg-type]
            b = _just_below(c, metric)
            if b < lo:
                break
        else:  # pragma: no cover - enormous fronts
            raise MpsError(f"the exact front has more than {max_points} points: pass n_points")
    else:
        for b in np.linspace(lo, hi, max(2, int(n_points))):
            b = float(b) if metric == "latency" else int(math.floor(b))
            idx = _milp(prob, **_with_cost(kw, metric, b), order=_ORDER[metric])
            if idx is not None:
                points[tuple(idx)] = idx
    cands = [candidate_of(prob, idx, "ilp front") for idx in points.values()]
    from mpsearch.searching._front import pareto

    objs = ("proxy_loss", "predicted_latency_ms" if metric == "latency" else "memory_bytes")
    return sorted(pareto(cands, objs), key=lambda c: c.value(objs[1]))


def _with_cost(kw: dict[str, Any], metric: str, b: float) -> dict[str, Any]:
    out = dict(kw)
    out["budget_ms" if metric == "latency" else "budget_bytes"] = b
    return out


def _just_below(c: float, metric: str) -> float:
    if metric == "memory":
        return float(int(c) - 1)
    return c - max(1e-12, 1e-9 * abs(c))


# -- the MILP itself ----------------------------------------------------------------------
def loss_tolerance(prob: ProxyProblem) -> float:
    """Losses closer than this to the optimum are ties for the ILP (``TIE_RTOL`` x the largest score).

    Example:
        >>> loss_tolerance(prob)      # doctest: +SKIP
        2e-06
    """
    return _tolerance(prob.loss_tab)


def _tolerance(tab: Sequence[np.ndarray]) -> float:
    top = max((float(np.max(np.abs(t))) for t in tab if len(t)), default=0.0)
    return TIE_RTOL * top if top > 0 else 0.0


def _milp(prob: ProxyProblem, budget_ms: float | None, budget_bytes: float | None,
          order: Sequence[str] = ("latency", "memory")) -> list[int] | None:
    """Lexicographic optimum within the budgets (loss, then ``order``), polished; None if infeasible.

    Stage ``k`` minimises its objective with every earlier objective capped at the earlier
    stage's value plus its tolerance; the earlier stage's answer meets those caps, so a stage
    the solver cannot improve (or that only tolerance-level noise makes infeasible) keeps it.
    """
    idx = _solve_once(prob, prob.loss_tab, budget_ms, budget_bytes)
    if idx is None:
        return None
    caps: list[_Cap] = [_Cap(prob.loss(idx) + loss_tolerance(prob), prob.loss_tab, 0.0, prob.loss)]
    for metric in order:
        if metric == "latency" and prob.ms_tab is not None:
            tab, offset, value = prob.ms_tab, prob.ms_offset, prob.latency_ms
        elif metric == "memory" and prob.bytes_tab is not None:
            tab, offset, value = prob.bytes_tab, float(prob.bytes_offset), prob.memory_bytes
        else:
            continue
        ftab = [np.asarray(t, dtype=float) for t in tab]
        if any(len(set(ftab[d].tolist())) > 1 for d in prob.free):  # else every policy costs the same
            better = _solve_once(prob, ftab, budget_ms, budget_bytes, caps)
            if better is not None and float(value(better)) <= float(value(idx)):  # type: ignore[arg-type]
                idx = better
        caps.append(_Cap(float(value(idx)) + _tolerance(ftab), ftab, offset, value))  # type: ignore[arg-type]
    return polish(prob, idx)


class _Cap:
    """A row ``offset + sum(tab[d][c]) <= rhs`` whose exact value is ``value(idx)``."""

    def __init__(self, rhs: float, tab: Sequence[np.ndarray], offset: float, value: Any) -> None:
        self.rhs, self.tab, self.offset, self.value = float(rhs), tab, float(offset), value


def polish(prob: ProxyProblem, idx: list[int]) -> list[int]:
    """Move decisions to choices no worse in loss and in every cost, and cheaper in one.

    Among policies of equal loss the solver may return a costlier one (e.g. a layer scored 0
    in every format); this makes each ILP point Pareto-optimal against single-decision changes,
    which is where such ties live. Never raises the loss or any cost, so budgets still hold.
    """
    tabs = [t for t in (prob.ms_tab, prob.bytes_tab) if t is not None]
    idx = list(idx)
    for d in prob.free:
        cur = idx[d]
        best = cur
        for c in range(len(prob.decisions[d].choices)):
            if c == cur or prob.loss_tab[d][c] > prob.loss_tab[d][cur]:
                continue
            deltas = [float(t[d][c]) - float(t[d][cur]) for t in tabs]
            if all(x <= 0 for x in deltas) and any(x < 0 for x in deltas):
                if best == cur or _cheaper(tabs, d, c, best):
                    best = c
        idx[d] = best
    return idx


def _cheaper(tabs: list[list[np.ndarray]], d: int, a: int, b: int) -> bool:
    return tuple(float(t[d][a]) for t in tabs) < tuple(float(t[d][b]) for t in tabs)


def _solve_once(
    prob: ProxyProblem,
    objective: list[np.ndarray],
    budget_ms: float | None,
    budget_bytes: float | None,
    caps: Sequence[_Cap] = (),
) -> list[int] | None:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    free = prob.free
    free_set = set(free)
    fixed = [d for d in range(prob.n) if d not in free_set]
    if not free:
        idx = [0] * prob.n
        ok = _fits(prob, idx, budget_ms, budget_bytes) and all(float(c.value(idx)) <= c.rhs for c in caps)
        return idx if ok else None
    offsets, cols = [], []
    for d in free:
        offsets.append(len(cols))
        cols.extend((d, c) for c in range(len(prob.decisions[d].choices)))
    nvar = len(cols)
    c_vec = np.concatenate([np.asarray(objective[d], dtype=float) for d in free])
    c_scale = _OBJ_SCALE / float(np.max(np.abs(c_vec))) if np.any(c_vec) else 1.0
    rows = [r for r, d in enumerate(free) for _ in prob.decisions[d].choices]
    colidx = list(range(nvar))
    data = [1.0] * nvar
    # (coefficients, constant, rhs, exact value of a choice vector)
    budget_rows: list[tuple[np.ndarray, float, float, Any]] = []
    if budget_ms is not None:
        const = prob.ms_offset + sum(float(prob.ms_tab[d][0]) for d in fixed)  # type: ignore[index]
        coef = np.concatenate([prob.ms_tab[d] for d in free]).astype(float)  # type: ignore[index]
        budget_rows.append((coef, const, float(budget_ms), prob.latency_ms))
    if budget_bytes is not None:
        const = prob.bytes_offset + sum(float(prob.bytes_tab[d][0]) for d in fixed)  # type: ignore[index]
        coef = np.concatenate([prob.bytes_tab[d] for d in free]).astype(float)  # type: ignore[index]
        budget_rows.append((coef, const, float(budget_bytes), prob.memory_bytes))
    for cap in caps:
        const = cap.offset + sum(float(cap.tab[d][0]) for d in fixed)
        coef = np.concatenate([np.asarray(cap.tab[d], dtype=float) for d in free])
        budget_rows.append((coef, const, cap.rhs, cap.value))
    slack = [0.0] * len(budget_rows)
    for _attempt in range(_MAX_TIGHTEN):
        A_rows, A_data, A_cols = list(rows), list(data), list(colidx)
        blb, bub = [1.0] * len(free), [1.0] * len(free)
        for k, (coef, const, rhs, _) in enumerate(budget_rows):
            scale = _ROW_SCALE / float(np.max(np.abs(coef))) if np.any(coef) else 1.0
            nz = np.nonzero(coef)[0]
            A_rows.extend([len(free) + k] * len(nz))
            A_cols.extend(nz.tolist())
            A_data.extend((coef[nz] * scale).tolist())
            blb.append(-np.inf)
            bub.append((rhs - const - slack[k]) * scale)
        A = csr_matrix((A_data, (A_rows, A_cols)), shape=(len(free) + len(budget_rows), nvar))
        with _quiet_stdout():  # HiGHS prints debug lines on the C stdout in some builds
            res = milp(
                c_vec * c_scale,
                constraints=LinearConstraint(A, np.array(blb), np.array(bub)),
                integrality=np.ones(nvar),
                bounds=Bounds(0, 1),
                options={"mip_rel_gap": 0.0, "presolve": True},
            )
        if res.x is None:
            if res.status == 2:  # infeasible
                return None
            raise MpsError(f"the ILP solver stopped without a solution: {res.message}")
        idx = [0] * prob.n
        for d, off in zip(free, offsets):
            idx[d] = int(np.argmax(res.x[off : off + len(prob.decisions[d].choices)]))
        over = [float(value(idx)) - rhs for _, _, rhs, value in budget_rows]
        if all(o <= 0.0 for o in over):
            return idx
        for k, o in enumerate(over):
            # HiGHS accepts x within its integrality tolerance (1e-6) of 0/1, which can hide a
            # violation of that size once rounded: tighten the row, geometrically, and resolve
            if o > 0:
                floor = 1e-6 * float(np.max(np.abs(budget_rows[k][0])))
                slack[k] = max(2 * slack[k], 2 * o, floor)
    return None


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 (C-level prints of the solver) for the duration."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real stdout (embedded, some test runners)
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            try:
                yield
            finally:
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def _fits(prob: ProxyProblem, idx: Sequence[int], budget_ms: float | None, budget_bytes: float | None) -> bool:
    if budget_ms is not None and prob.latency_ms(idx) > budget_ms:
        return False
    if budget_bytes is not None and (prob.memory_bytes(idx) or 0) > budget_bytes:
        return False
    return True


# -- budgets and messages -------------------------------------------------------------------
def _mb_to_bytes(budget_mb: float | None) -> int | None:
    if budget_mb is None:
        return None
    if not (isinstance(budget_mb, (int, float)) and math.isfinite(budget_mb) and budget_mb > 0):
        raise MpsError(f"budget_mb must be a positive number of MiB, got {budget_mb!r}")
    return int(math.floor(float(budget_mb) * BYTES_PER_MB))


def _check_budgets(prob: ProxyProblem, budget_ms: float | None, budget_bytes: int | None, warn: bool) -> None:
    if budget_ms is None and budget_bytes is None:
        raise MpsError("no budget: give budget_ms (latency, ms) and/or budget_mb (weight memory, MiB)")
    if budget_ms is not None:
        if not (isinstance(budget_ms, (int, float)) and math.isfinite(budget_ms) and budget_ms > 0):
            raise MpsError(f"budget_ms must be a positive number of milliseconds, got {budget_ms!r}")
        if prob.ms_tab is None:
            raise MpsError("a latency budget (budget_ms) needs a latency table (--latency)")
    if budget_bytes is not None and prob.bytes_tab is None:
        raise MpsError("a memory budget (budget_mb) needs layer shapes: pass the model (--model)")
    if budget_ms is not None and prob.latency_ms(prob.fastest()) > budget_ms:
        raise InfeasibleBudget(_infeasible_message(prob, budget_ms, budget_bytes, joint=False))
    if budget_bytes is not None and (prob.memory_bytes(prob.smallest()) or 0) > budget_bytes:
        raise InfeasibleBudget(_infeasible_message(prob, budget_ms, budget_bytes, joint=False))
    if warn and budget_ms is not None and budget_ms >= prob.latency_ms(prob.slowest()):
        warnings.warn(
            f"budget_ms={budget_ms:g} is at or above the slowest policy of space {prob.space_name!r} "
            f"({prob.latency_ms(prob.slowest()):.4g} ms predicted): it constrains nothing",
            UserWarning,
            stacklevel=3,
        )
    if warn and budget_bytes is not None and budget_bytes >= (prob.memory_bytes(prob.largest()) or 0):
        warnings.warn(
            f"budget_mb={budget_bytes / BYTES_PER_MB:g} is at or above the largest policy of space {prob.space_name!r} "
            f"({(prob.memory_bytes(prob.largest()) or 0) / BYTES_PER_MB:.4g} MiB): it constrains nothing",
            UserWarning,
            stacklevel=3,
        )


def _infeasible_message(prob: ProxyProblem, budget_ms: float | None, budget_bytes: int | None, joint: bool) -> str:
    parts = []
    asked = []
    if budget_ms is not None:
        asked.append(f"budget_ms={budget_ms:g}")
    if budget_bytes is not None:
        asked.append(f"budget_mb={budget_bytes / BYTES_PER_MB:g}")
    head = f"no policy of search space {prob.space_name!r} meets {' and '.join(asked)}"
    if prob.ms_tab is not None:
        f = prob.fastest()
        parts.append(f"fastest: {prob.latency_ms(f):.4g} ms predicted ({prob.summary(f)})")
    if prob.bytes_tab is not None:
        s = prob.smallest()
        parts.append(f"smallest: {(prob.memory_bytes(s) or 0) / BYTES_PER_MB:.4g} MiB ({prob.summary(s)})")
    tail = "; ".join(parts)
    if joint and budget_ms is not None and budget_bytes is not None:
        head += " together (each alone can be met)"
    return f"{head}; {tail}"
