"""Plots (matplotlib, PNG and SVG): plotting code only, it takes data objects.

Every function writes ``<path_stem>.png`` and ``<path_stem>.svg`` and returns both paths. The
figures are built with :class:`matplotlib.figure.Figure` (no pyplot state, no display needed).

Example:
    >>> from mpsearch.plots import sensitivity_heatmap
    >>> paths = sensitivity_heatmap(report, layers, "out/sensitivity")   # doctest: +SKIP
    >>> [p.suffix for p in paths]                                        # doctest: +SKIP
    ['.png', '.svg']
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from mpsearch.errors import MpsError

#: Panels of the sensitivity heatmap, side by side.
HEATMAP_GROUPS = (("vision", "vision encoder"), ("language", "language model"))


def _save(fig: Any, path_stem: str | Path) -> list[Path]:
    stem = Path(path_stem)
    if stem.suffix.lower() in (".png", ".svg"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")]
    fig.savefig(out[0], dpi=150, bbox_inches="tight")
    fig.savefig(out[1], bbox_inches="tight")
    return out


def sensitivity_matrix(report: Any, layers: Sequence[Any] | None, group: str) -> tuple[list[int], list[str], list[list[float]], set[int]]:
    """``(depths, formats, values, dead_depths)`` of one group: ``values[i][j]`` is the sum of
    the scores in ``formats[j]`` of the layers of block ``depths[i]`` (NaN where none is scored);
    ``dead_depths`` are blocks whose layers all do not reach the output.

    Example:
        >>> from mpsearch.sensitivity import SensitivityReport
        >>> r = SensitivityReport({"a": {"x": 1.0}, "b": {"x": 2.0}},
        ...                       meta={"groups": {"a": "vision", "b": "vision"}, "depths": {"a": 0, "b": 0}})
        >>> sensitivity_matrix(r, None, "vision")[2]
        [[3.0]]
    """
    if layers is not None:
        groups = {l.name: l.group for l in layers}
        depths = {l.name: getattr(l, "depth", None) for l in layers}
    else:
        groups = dict(report.meta.get("groups") or {})
        depths = dict(report.meta.get("depths") or {})
        if not groups:
            raise MpsError("sensitivity heatmap: the report has no layer groups/depths in meta; pass the model's layers")
    names = [n for n in report.scores if groups.get(n) == group and depths.get(n) is not None]
    ds = sorted({int(depths[n]) for n in names})
    fmts = [f for f in report.formats() if any(f in report.scores[n] for n in names)]
    values = []
    for d in ds:
        block = [n for n in names if int(depths[n]) == d]
        row = []
        for f in fmts:
            vals = [report.scores[n][f] for n in block if f in report.scores[n]]
            row.append(math.fsum(vals) if vals else math.nan)
        values.append(row)
    dead = set(report.meta.get("dead") or [])
    dead_depths = {d for d in ds if all(n in dead for n in names if int(depths[n]) == d)}
    return ds, fmts, values, dead_depths


def sensitivity_heatmap(report: Any, layers: Sequence[Any] | None, path_stem: str | Path) -> list[Path]:
    """Heatmap of sensitivity by block depth (rows) and format (columns), vision encoder and
    language model side by side, on one log colour scale. Zero scores (the model's own
    precision) are blank; blocks that do not reach the output are marked. Writes PNG and SVG.

    ``layers``: the model's :class:`mpsearch.Layer` list (None: groups and depths from the
    report's ``meta``, as written by :func:`mpsearch.profile`).

    Example:
        >>> sensitivity_heatmap(sens, layers, "sens_heatmap")   # doctest: +SKIP
        [PosixPath('sens_heatmap.png'), PosixPath('sens_heatmap.svg')]
    """
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    panels = []
    for group, title in HEATMAP_GROUPS:
        ds, fmts, values, dead = sensitivity_matrix(report, layers, group)
        if ds:
            panels.append((title, ds, fmts, np.asarray(values, dtype=float), dead))
    if not panels:
        raise MpsError("sensitivity heatmap: no vision or language layers with a block depth in the report")
    positive = np.concatenate([p[3][np.isfinite(p[3]) & (p[3] > 0)] for p in panels])
    norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max())) if positive.size else None
    height = max(3.5, 0.3 * max(len(p[1]) for p in panels) + 2.0)
    width = sum(1.2 + 0.55 * len(p[2]) for p in panels) + 1.5
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (title, ds, fmts, vals, dead) in zip(axes, panels):
        masked = np.ma.masked_where(~np.isfinite(vals) | (vals <= 0), vals)
        image = ax.imshow(masked, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        ax.set_facecolor("#eeeeee")
        ax.set_xticks(range(len(fmts)), fmts, rotation=45, ha="right")
        ax.set_yticks(range(len(ds)), [f"{d}{'  (not reaching output)' if d in dead else ''}" for d in ds])
        ax.set_title(f"{title} ({len(ds)} blocks)")
        ax.set_xlabel("format")
        ax.set_ylabel("block depth")
    if image is not None and norm is not None:
        cb = fig.colorbar(image, ax=list(axes), shrink=0.9, pad=0.02)
        cb.set_label(f"{report.method or 'sensitivity'} score, sum over the block's layers")
    fig.suptitle(f"Layer sensitivity: {report.meta.get('model', '') or ''}".rstrip(": "))
    return _save(fig, path_stem)
