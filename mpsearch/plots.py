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
from typing import Any, Sequence

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


# --------------------------------------------------------------------------- fronts and policies
def _kind(label: str, baseline: bool = False) -> str:
    if baseline or label in ("fp32", "bf16", "fp16", "full precision") or label.startswith("baseline"):
        return "full precision"
    if label.startswith("uniform"):
        return "uniform"
    if label.startswith("ilp"):
        return "ILP (proxy optimum)"
    return "searched"


_STYLE = {
    "full precision": dict(marker="*", color="black", s=160, zorder=5),
    "uniform": dict(marker="s", color="tab:gray", s=55, zorder=4),
    "ILP (proxy optimum)": dict(marker="D", color="tab:orange", s=70, zorder=5),
    "searched": dict(marker="o", color="tab:blue", s=55, zorder=6),
}


def _pareto_xy(points: Sequence[tuple[float, float]], maximize_y: bool = True) -> list[tuple[float, float]]:
    """The non-dominated points (lower x, higher y when ``maximize_y``), sorted by x, each once.

    Uses :func:`mpsearch.searching._front.pareto_indices`, the one Pareto filter.
    """
    from mpsearch.searching._front import pareto_indices

    sign = -1.0 if maximize_y else 1.0
    keep = pareto_indices([(x, sign * y) for x, y in points])
    return sorted({(float(points[i][0]), float(points[i][1])) for i in keep}, key=lambda p: (p[0], sign * p[1]))


def _scatter_results(ax: Any, results: Sequence[Any], x_of: Any, y_of: Any, err_of: Any = None,
                     maximize_y: bool = True, annotate: bool = True) -> None:
    seen: set[str] = set()
    pts = []
    for r in results:
        x, y = x_of(r), y_of(r)
        if x is None or y is None or not math.isfinite(x) or not math.isfinite(y):
            continue
        kind = _kind(r.label, getattr(r, "baseline", False))
        style = dict(_STYLE[kind])
        ax.scatter([x], [y], label=None if kind in seen else kind, edgecolors="white", linewidths=0.6, **style)
        seen.add(kind)
        if err_of is not None:
            lo, hi = err_of(r)
            ax.errorbar([x], [y], yerr=[[max(y - lo, 0.0)], [max(hi - y, 0.0)]], fmt="none",
                        ecolor=style["color"], alpha=0.45, capsize=3, zorder=3)
        if annotate:
            ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, alpha=0.85)
        pts.append((x, y))
    front = _pareto_xy(pts, maximize_y)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:blue", alpha=0.35,
                linewidth=1.2, zorder=2, label="measured Pareto front")


def pareto_front(results: Sequence[Any], path_stem: str | Path, proxy_front: Sequence[Any] | None = None,
                 budget_ms: float | None = None, budget_mb: float | None = None, title: str = "") -> list[Path]:
    """Measured trade-offs of evaluated policies, four panels, PNG and SVG.

    Top: accuracy (with its 95% Wilson interval) against measured latency and against
    weight memory. Bottom left: KL divergence to the full-precision model against measured
    latency (it separates policies whose accuracy differences are within the noise). Bottom
    right: the proxy front the search found (predicted latency against summed sensitivity),
    with the ILP optimum and the uniform policies marked. Full precision, uniform baselines,
    the ILP policy and searched policies have their own markers and are labelled.

    Example:
        >>> pareto_front(results, "plots/pareto", proxy_front=front, budget_ms=3.0)  # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    if not results:
        raise MpsError("pareto plot: no results")
    fig = Figure(figsize=(13, 9.5), layout="constrained")
    (ax_lat, ax_mem), (ax_kl, ax_proxy) = fig.subplots(2, 2)
    pct = lambda r: 100.0 * r.accuracy  # noqa: E731
    ci = lambda r: (100.0 * r.accuracy_ci[0], 100.0 * r.accuracy_ci[1])  # noqa: E731
    _scatter_results(ax_lat, results, lambda r: r.latency_ms, pct, ci)
    ax_lat.set_xlabel("measured latency (ms)")
    ax_lat.set_ylabel("accuracy (%), 95% Wilson interval")
    ax_lat.set_title("accuracy vs measured latency")
    _scatter_results(ax_mem, results, lambda r: (r.memory_bytes or math.nan) / 2**20, pct, ci)
    ax_mem.set_xlabel("model weight memory (MiB)")
    ax_mem.set_ylabel("accuracy (%)")
    ax_mem.set_title("accuracy vs weight memory")
    kl_results = [r for r in results if r.kl is not None and r.kl > 0]
    if kl_results:
        _scatter_results(ax_kl, kl_results, lambda r: r.latency_ms, lambda r: r.kl, maximize_y=False)
        ax_kl.set_yscale("log")
    ax_kl.set_xlabel("measured latency (ms)")
    ax_kl.set_ylabel("KL to full precision (nats, log scale)")
    ax_kl.set_title("output divergence vs measured latency (lower is better)")
    if budget_ms is not None:
        for ax in (ax_lat, ax_kl):
            ax.axvline(budget_ms, color="tab:red", linestyle="--", linewidth=1, label=f"budget {budget_ms:.2f} ms")
    if budget_mb is not None:
        ax_mem.axvline(budget_mb, color="tab:red", linestyle="--", linewidth=1, label=f"budget {budget_mb:.2f} MiB")
    if proxy_front:
        xs = [c.predicted_latency_ms for c in proxy_front]
        ys = [c.proxy_loss for c in proxy_front]
        ax_proxy.scatter(xs, ys, s=18, color="tab:blue", alpha=0.6, label="search front (proxy)")
        for c in proxy_front:
            src = str(getattr(c, "source", ""))
            if src.startswith(("ilp", "uniform")):
                kind = "ILP (proxy optimum)" if src.startswith("ilp") else "uniform"
                st = dict(_STYLE[kind])
                st["s"] = 45
                ax_proxy.scatter([c.predicted_latency_ms], [c.proxy_loss], edgecolors="white", **st)
                if src == "ilp" or src.startswith("uniform"):  # the ILP front's other points stay unlabelled
                    ax_proxy.annotate(src, (c.predicted_latency_ms, c.proxy_loss), textcoords="offset points",
                                      xytext=(4, 3), fontsize=7, alpha=0.8)
        positive = [y for y in ys if y > 0]
        if positive and max(positive) / max(min(positive), 1e-300) > 100:
            ax_proxy.set_yscale("symlog", linthresh=min(positive))
        if budget_ms is not None:
            ax_proxy.axvline(budget_ms, color="tab:red", linestyle="--", linewidth=1)
    ax_proxy.set_xlabel("predicted latency (ms, latency table)")
    ax_proxy.set_ylabel("proxy loss (summed sensitivity)")
    ax_proxy.set_title("proxy front of the search")
    for ax in (ax_lat, ax_mem, ax_kl, ax_proxy):
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title or "Measured Pareto front")
    return _save(fig, path_stem)


def bit_allocation(policy: Any, layers: Sequence[Any], path_stem: str | Path, title: str = "") -> list[Path]:
    """Bits per weight of each layer under ``policy``, along depth, one panel per group.

    Bars are coloured by format; the x axis follows module order (block depth ticks), so it
    shows where the policy spends its precision (e.g. first/last blocks, vision vs language).

    Example:
        >>> bit_allocation(policy, layers, "plots/bits")   # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    from mpsearch.formats import get_format
    from mpsearch.models.groups import GROUPS

    groups = [g for g in GROUPS if any(l.group == g for l in layers)]
    fmts = sorted({policy.format_for(l.name) for l in layers}, key=lambda f: -get_format(f).bits)
    cmap = {f: c for f, c in zip(fmts, ["tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:red",
                                          "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"])}
    widths = [max(2.0, 0.09 * sum(1 for l in layers if l.group == g)) for g in groups]
    fig = Figure(figsize=(max(9.0, sum(widths) + 2), 4.2), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True, width_ratios=widths)[0]
    for ax, g in zip(axes, groups):
        members = [l for l in layers if l.group == g]
        for i, l in enumerate(members):
            f = policy.format_for(l.name)
            ax.bar(i, get_format(f).bits, color=cmap[f], width=0.85)
        ticks = [(i, l.depth) for i, l in enumerate(members) if l.depth is not None and
                 (i == 0 or members[i - 1].depth != l.depth)]
        ax.set_xticks([t[0] for t in ticks], [str(t[1]) for t in ticks], fontsize=7)
        ax.set_title(f"{g} ({len(members)} layers)")
        ax.set_xlabel("block depth" if ticks else "layer")
    axes[0].set_ylabel("bits per weight (nominal)")
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=cmap[f], label=f) for f in fmts], loc="outside right upper", fontsize=8)
    fig.suptitle(title or f"Bit allocation: {policy.label}")
    return _save(fig, path_stem)


def predicted_vs_measured(pairs: Sequence[tuple[str, float, float]], path_stem: str | Path,
                          title: str = "") -> list[Path]:
    """Predicted (latency table) against measured end-to-end latency, one point per policy.

    ``pairs``: ``(label, predicted_ms, measured_ms)``. The diagonal is a perfect prediction; the
    title gives the median and worst relative error.

    Example:
        >>> predicted_vs_measured([("fp32", 3.1, 3.0)], "plots/latency_fidelity")  # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    pts = [(lab, p, m) for lab, p, m in pairs if p is not None and m is not None and m > 0]
    if not pts:
        raise MpsError("predicted-vs-measured plot: no policy has both a predicted and a measured latency")
    errs = sorted(abs(p / m - 1.0) for _, p, m in pts)
    med = errs[len(errs) // 2] if len(errs) % 2 else 0.5 * (errs[len(errs) // 2 - 1] + errs[len(errs) // 2])
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.subplots()
    lo = min(min(p, m) for _, p, m in pts) * 0.9
    hi = max(max(p, m) for _, p, m in pts) * 1.1
    ax.plot([lo, hi], [lo, hi], color="gray", linestyle="--", linewidth=1, label="prediction = measurement")
    for lab, p, m in pts:
        kind = _kind(lab)
        ax.scatter([m], [p], edgecolors="white", **_STYLE[kind])
        ax.annotate(lab, (m, p), textcoords="offset points", xytext=(4, 3), fontsize=7, alpha=0.8)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"latency table fidelity: median error {100 * med:.1f}%, worst {100 * errs[-1]:.1f}% "
                          f"({len(pts)} policies)", fontsize=10)
    return _save(fig, path_stem)


def all_plots(results: Sequence[Any], out_dir: str | Path, proxy_front: Sequence[Any] | None = None,
              sens: Any = None, layers: Sequence[Any] | None = None, chosen: Any = None,
              budget_ms: float | None = None, budget_mb: float | None = None, title: str = "",
              latency_validation: Sequence[tuple[str, float, float]] | None = None) -> list[Path]:
    """Every plot a run produces, into ``out_dir`` (PNG and SVG each).

    Example:
        >>> all_plots(results, "runs/demo/plots", proxy_front=front, sens=sens, layers=layers)  # doctest: +SKIP
    """
    out = Path(out_dir)
    paths = pareto_front(results, out / "pareto", proxy_front=proxy_front, budget_ms=budget_ms,
                         budget_mb=budget_mb, title=title)
    if sens is not None:
        paths += sensitivity_heatmap(sens, layers, out / "sensitivity")
    if chosen is not None and layers is not None:
        paths += bit_allocation(chosen.policy, layers, out / "bits", title=f"Bit allocation of the exported policy "
                                                                            f"({chosen.label})")
    pairs = list(latency_validation or []) + [(r.label, r.predicted_latency_ms, r.latency_ms) for r in results]
    if any(p is not None and m is not None for _, p, m in pairs):
        paths += predicted_vs_measured(pairs, out / "latency_fidelity")
    return paths
