"""Scoring a pass: accuracy intervals, per-subject, per-discipline and per-skill accuracy.

Accuracy intervals are Wilson score intervals (95 %): unlike a percentile bootstrap they do not
collapse to a point at 0 or n correct answers out of n.

Example:
    >>> lo, hi = wilson_ci(10, 10)
    >>> hi == 1.0 and 0.69 < lo < 0.73
    True
    >>> skill_accuracy([("perception", True), ("reasoning", False), ("perception", False)])["perception"][0]
    0.5
"""
from __future__ import annotations

from typing import Iterable

__all__ = ["wilson_ci", "skill_accuracy", "CONFIDENCE"]

CONFIDENCE = 0.95


def wilson_ci(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of ``correct`` successes in ``n`` trials (``(0, 0)`` for n = 0).

    Computed by :meth:`scipy.stats.binomtest(...).proportion_ci` (``method="wilson"``).
    """
    if n <= 0:
        return (0.0, 0.0)
    from scipy.stats import binomtest

    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def skill_accuracy(pairs: Iterable[tuple[str | None, bool]]) -> dict[str, tuple[float, tuple[float, float], int]]:
    """``skill -> (accuracy, Wilson interval, n)`` over ``(skill, correct)`` pairs; unlabelled
    questions (skill None or empty) are left out, so a benchmark without skills gives ``{}``."""
    counts: dict[str, list[int]] = {}
    for skill, ok in pairs:
        if skill:
            c = counts.setdefault(str(skill), [0, 0])
            c[0] += bool(ok)
            c[1] += 1
    return {s: (k / n, wilson_ci(k, n), n) for s, (k, n) in sorted(counts.items())}
