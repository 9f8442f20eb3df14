"""Checking a latency table against reality, and correcting it where it is off.

``validate_table`` times the uniform policies and ``k`` random policies of the search space end
to end (interleaved round-robin, see :func:`mpsearch.latency.end_to_end.measure_policies`) and
compares them with ``table.predict``. ``fit_correction`` fits, by non-negative least squares on
*relative* residuals, an offset and one scale per format::

    measured(p) ~= b + sum_f s_f * sum_{layers l in format f under p} ms[l][f]

and returns a corrected table (``base_ms = b``, ``ms[l][f] *= s_f``), which stays additive so the
ILP and the proxy search can use it. Its error is reported by leave-one-out cross-validation
(each policy predicted by a correction fitted without it), never on the runs it was fitted on.

Example:
    >>> report = validate_table(lat, model, layers, space, Workload(threads=1), k=20)  # doctest: +SKIP
    >>> print(report.summary())                                                    # doctest: +SKIP
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from mpsearch.errors import MpsError
from mpsearch.latency.end_to_end import measure_policies
from mpsearch.latency.model_info import current_device_name
from mpsearch.latency.policies import random_policies, uniform_policies
from mpsearch.latency.table import LatencyTable
from mpsearch.latency.timing import Timing
from mpsearch.latency.workload import Workload


@dataclass
class ValidationRow:
    """One policy: predicted and measured ms and the relative error (predicted/measured - 1)."""

    label: str
    policy: Any
    predicted_ms: float
    measured: Timing
    corrected_ms: float | None = None
    stat: str = "median"

    @property
    def measured_ms(self) -> float:
        """The measured statistic (the workload's ``stat``: median, or min)."""
        return self.measured.value(self.stat)

    @property
    def error(self) -> float:
        """Signed relative error of the prediction."""
        return self.predicted_ms / self.measured_ms - 1.0

    @property
    def corrected_error(self) -> float | None:
        """Signed relative error of the cross-validated corrected prediction."""
        return None if self.corrected_ms is None else self.corrected_ms / self.measured_ms - 1.0


@dataclass
class Correction:
    """A fitted offset and per-format scales (see the module docstring)."""

    base_ms: float
    scale: dict[str, float]
    fitted_on: int
    cv_median_error: float | None = None
    cv_worst_error: float | None = None

    def apply(self, table: LatencyTable) -> LatencyTable:
        """The corrected table (additive: base replaced, each format's times scaled)."""
        ms = {l: {f: v * self.scale.get(f, 1.0) for f, v in row.items()} for l, row in table.ms.items()}
        meta = dict(table.meta)
        meta["correction"] = self.to_dict()
        meta["uncorrected_base_ms"] = table.base_ms
        return LatencyTable(self.base_ms, ms, meta)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {"method": "offset + per-format scale, NNLS on relative residuals", "base_ms": self.base_ms,
                "scale": dict(self.scale), "fitted_on": self.fitted_on,
                "cv_median_error": self.cv_median_error, "cv_worst_error": self.cv_worst_error}


def _features(table: LatencyTable, policy: Any, formats: Sequence[str]) -> list[float]:
    sums = dict.fromkeys(formats, 0.0)
    for layer, row in table.ms.items():
        f = policy.format_for(layer)
        sums[f] = sums.get(f, 0.0) + table.layer_ms(layer, f)
    return [1.0] + [sums[f] for f in formats]


def _fit(table: LatencyTable, pairs: Sequence[tuple[Any, float]], formats: Sequence[str]) -> Correction:
    import numpy as np
    from scipy.optimize import lsq_linear

    X = np.array([_features(table, p, formats) for p, _ in pairs], dtype=float)
    y = np.array([m for _, m in pairs], dtype=float)
    w = 1.0 / y  # relative residuals
    used = [j for j in range(1, X.shape[1]) if X[:, j].any()]
    cols = [0] + used
    res = lsq_linear(X[:, cols] * w[:, None], y * w, bounds=(0.0, np.inf))
    coef = dict(zip(cols, res.x))
    scale = {f: float(coef.get(j + 1, 1.0)) for j, f in enumerate(formats)}
    return Correction(float(coef[0]), scale, len(pairs))


def fit_correction(table: LatencyTable, pairs: Sequence[tuple[Any, float]]) -> Correction:
    """Fit the offset + per-format scale correction on ``(policy, measured_ms)`` pairs.

    Needs more pairs than parameters (formats used + 1); the leave-one-out errors are filled in.

    Example:
        >>> corr = fit_correction(lat, [(p, float(t)) for p, t in zip(pols, timings)])  # doctest: +SKIP
        >>> corrected = corr.apply(lat)                                                 # doctest: +SKIP
    """
    formats = table.formats()
    used = {f for p, _ in pairs for l in table.ms for f in [p.format_for(l)]}
    n_params = 1 + len([f for f in formats if f in used])
    if len(pairs) <= n_params:
        raise MpsError(f"fitting a latency correction needs more than {n_params} measured policies "
                       f"(offset + one scale per format used); got {len(pairs)}")
    corr = _fit(table, pairs, formats)
    errs = [abs(e) for e in loo_errors(table, pairs)]
    corr.cv_median_error = statistics.median(errs)
    corr.cv_worst_error = max(errs)
    return corr


def loo_predictions(table: LatencyTable, pairs: Sequence[tuple[Any, float]]) -> list[float]:
    """Each pair's prediction by a correction fitted on all the other pairs."""
    formats = table.formats()
    out = []
    for i, (policy, _) in enumerate(pairs):
        rest = [pm for j, pm in enumerate(pairs) if j != i]
        corr = _fit(table, rest, formats)
        out.append(corr.apply(table).predict(policy))
    return out


def loo_errors(table: LatencyTable, pairs: Sequence[tuple[Any, float]]) -> list[float]:
    """Signed relative leave-one-out errors of the correction."""
    return [p / m - 1.0 for p, (_, m) in zip(loo_predictions(table, pairs), pairs)]


@dataclass
class ValidationReport:
    """Predicted vs measured for a set of policies, with the cross-validated correction."""

    rows: list[ValidationRow]
    device: str = ""
    workload: dict[str, Any] = field(default_factory=dict)
    correction: Correction | None = None

    @property
    def median_error(self) -> float:
        """Median absolute relative error of the table's predictions."""
        return statistics.median(abs(r.error) for r in self.rows)

    @property
    def worst_error(self) -> float:
        """Largest absolute relative error of the table's predictions."""
        return max(abs(r.error) for r in self.rows)

    @property
    def noise(self) -> float:
        """Median relative spread (IQR / median) of the end-to-end measurements."""
        return statistics.median(r.measured.spread_ms / r.measured.median_ms for r in self.rows)

    def lines(self, roofline: Callable[[Any], float | None] | None = None) -> list[str]:
        """Human-readable table: label, predicted, measured (spread), error [, corrected, roofline]."""
        head = f"{'policy':<24} {'predicted':>10} {'measured':>10} {'spread':>8} {'error':>8}"
        if self.correction is not None:
            head += f" {'corrected*':>10} {'error':>8}"
        if roofline is not None:
            head += f" {'roofline':>9}"
        out = [head]
        for r in self.rows:
            line = (f"{r.label[:24]:<24} {r.predicted_ms:10.3f} {r.measured_ms:10.3f} {r.measured.spread_ms:8.3f} "
                    f"{r.error * 100:+7.1f}%")
            if self.correction is not None and r.corrected_ms is not None:
                line += f" {r.corrected_ms:10.3f} {r.corrected_error * 100:+7.1f}%"
            if roofline is not None:
                bound = roofline(r.policy)
                line += f" {bound:9.3f}" if bound is not None else f" {'-':>9}"
            out.append(line)
        return out

    def summary(self) -> str:
        """One paragraph: median and worst error, noise, and the correction's cross-validated errors."""
        text = (f"{len(self.rows)} policies on {self.device}: median |error| {self.median_error * 100:.1f}%, "
                f"worst {self.worst_error * 100:.1f}% (measurement spread, median IQR/median: {self.noise * 100:.1f}%)")
        c = self.correction
        if c is not None and c.cv_median_error is not None:
            text += (f"; with the fitted correction (leave-one-out): median {c.cv_median_error * 100:.1f}%, "
                     f"worst {c.cv_worst_error * 100:.1f}%")
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (schema'd by the caller)."""
        return {
            "device": self.device, "workload": self.workload,
            "median_error": self.median_error, "worst_error": self.worst_error, "noise": self.noise,
            "correction": self.correction.to_dict() if self.correction else None,
            "rows": [{"label": r.label, "predicted_ms": r.predicted_ms, "measured": r.measured.to_dict(),
                      "error": r.error, "corrected_ms": r.corrected_ms, "policy": r.policy.to_dict()}
                     for r in self.rows],
        }


def validate_table(table: LatencyTable, model: Any, layers: Sequence[Any], space: Any,
                   workload: Workload | None = None, k: int = 20, seed: int = 0,
                   policies: Sequence[Any] | None = None, fit: bool = True, progress: bool = False) -> ValidationReport:
    """Time the uniform policies plus ``k`` random ones and compare with ``table.predict``.

    With ``fit`` (and enough policies), the offset + per-format scale correction is fitted and
    each row also gets its leave-one-out corrected prediction.

    Example:
        >>> report = validate_table(lat, model, layers, space, Workload(threads=1), k=5)  # doctest: +SKIP
        >>> report.median_error < 0.1                                                 # doctest: +SKIP
        True
    """
    workload = workload or Workload()
    if policies is None:
        policies = uniform_policies(space, layers) + random_policies(space, layers, k, seed)
    policies = list(policies)
    if not policies:
        raise MpsError("validate_table: no policies to time")
    timings = measure_policies(model, layers, policies, workload, progress=progress)
    rows = [ValidationRow(str(p.meta.get("label") or p.key()), p, table.predict(p), t, stat=workload.stat)
            for p, t in zip(policies, timings)]
    report = ValidationReport(rows, current_device_name(model), workload.to_dict())
    if fit:
        pairs = [(r.policy, r.measured_ms) for r in rows]
        try:
            report.correction = fit_correction(table, pairs)
        except MpsError:
            report.correction = None
        else:
            for r, pred in zip(rows, loo_predictions(table, pairs)):
                r.corrected_ms = pred
    return report


__all__ = ["random_policies", "uniform_policies", "validate_table", "fit_correction", "ValidationReport",
           "ValidationRow", "Correction", "loo_predictions", "loo_errors"]
