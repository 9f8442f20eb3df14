"""What a measuring method returns for one phase, and the unique key timings are shared by.

Example:
    >>> unique_key((64, 128, True), [16], "fp32")
    (64, 128, True, (16,), 'fp32')
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class PhaseResult:
    """One phase measured by a method: base, per-layer ms, rows seen, and what it cost."""

    base_ms: float
    ms: dict[str, dict[str, float]]
    rows: dict[str, list[int]]
    keys: int
    forwards: int
    isolated_timings: int = 0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def unique_key(slot: tuple[int, int, bool], rows: Sequence[int], fmt: str) -> tuple[Any, ...]:
    """The unique key a timing is shared by: ``(in, out, bias, rows per call, format)``."""
    return (slot[0], slot[1], slot[2], tuple(rows), fmt)


def stat(values: Sequence[float], name: str) -> float:
    """``min`` or ``median`` of the values (a workload's ``stat``)."""
    return min(values) if name == "min" else statistics.median(values)


__all__ = ["PhaseResult", "unique_key", "stat"]
