"""The results table that ``mpsearch report`` and the run summary print.

Example:
    >>> from mpsearch.evaluation import Result
    >>> from mpsearch.policy import Policy
    >>> print(format_table([]).split()[:3])
    ['policy', 'latency_ms', 'memory_MiB']
"""
from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["format_table"]


def _fmt(value: Any, spec: str, none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def format_table(results: Sequence[Any]) -> str:
    """The report table of results (one row each; a column per skill where results have skills).

    Example:
        >>> from mpsearch.evaluation import Result
        >>> from mpsearch.policy import Policy
        >>> row = format_table([Result(Policy({}, "fp32", {"label": "fp32"}), 0.5, (0.25, 0.75), n=8,
        ...                            flips=0.0, kl=0.0, memory_bytes=2**20)]).splitlines()[1]
        >>> row.split()[:5]
        ['fp32', '-', '1.00', '50.0', '[25.0,']
    """
    skills = sorted({s for r in results for s in (getattr(r, "per_skill", None) or {})})
    headers = ["policy", "latency_ms", "memory_MiB", "acc%", "95% CI", *[f"{s}%" for s in skills],
               "flips%", "kl", "fallbacks", "n", "bench/split/mode"]
    rows = []
    for r in results:
        per_skill = getattr(r, "per_skill", None) or {}
        rows.append([
            r.label,
            _fmt(r.latency_ms, ".2f"),
            _fmt(None if r.memory_bytes is None else r.memory_bytes / 2**20, ".2f"),
            _fmt(100 * r.accuracy, ".1f"),
            f"[{100 * r.accuracy_ci[0]:.1f}, {100 * r.accuracy_ci[1]:.1f}]",
            *[_fmt(None if s not in per_skill else 100 * per_skill[s], ".1f") for s in skills],
            _fmt(None if r.flips is None else 100 * r.flips, ".1f"),
            _fmt(r.kl, ".4f"),
            str(r.fallbacks),
            str(r.n) + (f" (+{r.n_skipped} skipped)" if r.n_skipped else ""),
            f"{r.benchmark or '-'} / {r.split or '-'}" + (f" / {r.mode}" if r.benchmark else ""),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
