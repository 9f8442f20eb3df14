"""The sensitivity report: a score per layer per format, its JSON file and its summaries.

A score estimates how much worse the model gets when that one layer runs in that format
(the scale depends on the method: loss increase for ``hessian``/``fisher``, output error for
``activation``, KL divergence for ``kl``). The search treats scores as additive.

File format (``kind: "sensitivity"``)::

    {"schema": 1, "kind": "sensitivity", "method": "hessian",
     "scores": {"<layer>": {"<format>": float}},
     "meta": {"groups": {"<layer>": "vision"}, "depths": {...}, "dead": [...], ...},
     "provenance": {...}}

Example:
    >>> r = SensitivityReport({"a": {"fp32": 0.0, "bnb.nf4": 2.0}, "b": {"fp32": 0.0, "bnb.nf4": 1.0}})
    >>> r.score("a", "bnb.nf4"), r.ranking("bnb.nf4")[0]
    (2.0, ('a', 2.0))
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from mpsearch.artifacts import atomic_write_json, provenance as _provenance
from mpsearch.errors import MpsError
from mpsearch.models.groups import GROUPS  # the one place for the group names

KIND = "sensitivity"
#: Why a layer scores 0 regardless of format.
DEAD_REASON = "does not reach the output"


@dataclass
class SensitivityReport:
    """Scores ``{layer: {format: float}}`` from one method, with metadata and provenance.

    ``meta`` keys written by :func:`mpsearch.profile`: ``groups`` and ``depths`` (per layer),
    ``dead`` (layers that do not reach the output), ``n_samples``, ``seed``, ``model``, and per
    method ``hvp``/``n_probes``/``trace``/``trace_stderr`` (hessian), ``tie_groups`` (kl).

    Example:
        >>> r = SensitivityReport({"l": {"bf16": 0.1}}, method="activation")
        >>> r.to_json("/tmp/sens.json"); SensitivityReport.from_json("/tmp/sens.json").scores
        {'l': {'bf16': 0.1}}
    """

    scores: dict[str, dict[str, float]]
    method: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from mpsearch.schemas import SensitivityValues, validate_object

        valid = validate_object(SensitivityValues, {"scores": self.scores, "meta": self.meta or {}}, "SensitivityReport")
        self.scores = {layer: dict(per) for layer, per in valid.scores.items()}
        self.meta = dict(self.meta or {})

    # -- queries ------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Layer names, in the report's order."""
        return list(self.scores)

    @property
    def dead(self) -> list[str]:
        """Layers that do not reach the output (score 0 whatever the format)."""
        return list(self.meta.get("dead", []))

    def formats(self) -> list[str]:
        """Every format scored, in first-seen order."""
        seen: dict[str, None] = {}
        for per in self.scores.values():
            seen.update(dict.fromkeys(per))
        return list(seen)

    def score(self, layer: str, fmt: str) -> float:
        """The score of ``layer`` in ``fmt``; MpsError naming what is valid if absent.

        Example:
            >>> SensitivityReport({"l": {"bf16": 0.5}}).score("l", "bf16")
            0.5
        """
        per = self.scores.get(layer)
        if per is None:
            raise MpsError(f"sensitivity report has no layer {layer!r} ({len(self.scores)} layers, e.g. {_some(self.scores)})")
        if fmt not in per:
            raise MpsError(f"sensitivity report: layer {layer!r} has no score for format {fmt!r}; scored: {', '.join(per)}")
        return per[fmt]

    def group_of(self, layers: Sequence[Any] | Mapping[str, str] | None = None) -> dict[str, str]:
        """``{layer: group}`` from ``layers`` (Layer objects or a mapping), else from ``meta['groups']``."""
        if layers is None:
            groups = self.meta.get("groups")
            if not groups:
                raise MpsError("sensitivity report has no layer groups in meta; pass the model's layers")
            return dict(groups)
        if isinstance(layers, Mapping):
            return {str(k): str(v) for k, v in layers.items()}
        return {l.name: l.group for l in layers}

    def group_summary(self, layers: Sequence[Any] | Mapping[str, str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
        """Per group and format: ``{"total", "mean", "n"}`` over the layers scored in that format.

        Example:
            >>> r = SensitivityReport({"v": {"int8": 1.0}, "l": {"int8": 3.0}, "m": {"int8": 5.0}})
            >>> r.group_summary({"v": "vision", "l": "language", "m": "language"})["language"]["int8"]
            {'total': 8.0, 'mean': 4.0, 'n': 2}
        """
        group_of = self.group_of(layers)
        out: dict[str, dict[str, dict[str, float]]] = {}
        order = list(GROUPS) + sorted(set(group_of.values()) - set(GROUPS))
        for group in order:
            names = [n for n in self.scores if group_of.get(n) == group]
            if not names:
                continue
            per_fmt: dict[str, dict[str, float]] = {}
            for fmt in self.formats():
                vals = [self.scores[n][fmt] for n in names if fmt in self.scores[n]]
                if vals:
                    total = math.fsum(vals)
                    per_fmt[fmt] = {"total": total, "mean": total / len(vals), "n": len(vals)}
            out[group] = per_fmt
        return out

    def ranking(self, fmt: str | None = None, group: str | None = None,
                layers: Sequence[Any] | Mapping[str, str] | None = None) -> list[tuple[str, float]]:
        """Layers from most to least sensitive: by their score in ``fmt``, or (None) by their
        largest score over the formats scored for them. ``group`` keeps one group only.

        Example:
            >>> SensitivityReport({"a": {"x": 1.0, "y": 4.0}, "b": {"x": 2.0}}).ranking()
            [('a', 4.0), ('b', 2.0)]
        """
        group_of = self.group_of(layers) if (group is not None) else {}
        items = []
        for name, per in self.scores.items():
            if group is not None and group_of.get(name) != group:
                continue
            if fmt is None:
                if per:
                    items.append((name, max(per.values())))
            elif fmt in per:
                items.append((name, per[fmt]))
        return sorted(items, key=lambda kv: (-_nan_low(kv[1]), kv[0]))

    def summary_text(self, top: int = 5, layers: Sequence[Any] | Mapping[str, str] | None = None) -> str:
        """A few lines for the terminal: per-group totals, the most and least sensitive layers, dead layers."""
        lines = [f"sensitivity ({self.method or 'unknown method'}): {len(self.scores)} layers, formats {', '.join(self.formats())}"]
        try:
            summ = self.group_summary(layers)
        except MpsError:
            summ = {}
        if summ:
            fmts = self.formats()
            for stat in ("total", "mean"):
                lines.append(f"  {stat + ' per group':<18} " + " ".join(f"{f:>13}" for f in fmts))
                for group, per in summ.items():
                    n = int(max((v["n"] for v in per.values()), default=0))
                    cells = " ".join(f"{per[f][stat]:>13.4g}" if f in per else f"{'-':>13}" for f in fmts)
                    lines.append(f"  {group:<9} {n:>4} ly  {cells}")
        rank = self.ranking()
        if rank:
            lines.append("  most sensitive (largest score over formats):  " + ", ".join(f"{n} ({s:.3g})" for n, s in rank[:top]))
            live = [kv for kv in rank if kv[0] not in set(self.dead)]
            lines.append("  least sensitive (largest score over formats): " + ", ".join(f"{n} ({s:.3g})" for n, s in live[::-1][:top]))
        lines += self.uncertain_lines(top)
        if self.dead:
            lines.append(f"  {len(self.dead)} layer(s) {DEAD_REASON} (score 0, still cost latency): " + ", ".join(self.dead))
        return "\n".join(lines)

    def uncertain_lines(self, top: int = 5) -> list[str]:
        """Lines naming the layers whose Hessian trace interval did not exclude zero, and what was done.

        Example:
            >>> r = SensitivityReport({"a": {"fp32": 0.0}}, method="hessian", meta={"uncertain_trace":
            ...     {"a": {"mean": -0.5, "stderr": 1.0, "used": 2.5}}, "uncertain_trace_action": "scored with |mean| + 2 SE"})
            >>> r.uncertain_lines()[0]
            '  1 layer(s) whose Hessian trace interval contains zero, scored with |mean| + 2 SE:'
        """
        flagged = self.meta.get("uncertain_trace") or {}
        if not flagged:
            neg = self.meta.get("negative_trace") or []  # reports written before uncertain_trace
            if not neg:
                return []
            return [f"  {len(neg)} layer(s) with a negative Hessian trace estimate, scored 0: " + ", ".join(neg[:top])
                    + (" ..." if len(neg) > top else "")]
        action = self.meta.get("uncertain_trace_action") or "scored with |mean| + 2 SE"
        out = [f"  {len(flagged)} layer(s) whose Hessian trace interval contains zero, {action}:"]
        for name, d in list(flagged.items())[:top]:
            out.append(f"    {name}: trace {float(d['mean']):.3g} +- {float(d['stderr']):.2g} (SE) -> {float(d['used']):.3g}")
        if len(flagged) > top:
            out.append(f"    ... and {len(flagged) - top} more (meta.uncertain_trace)")
        return out

    # -- files --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON object written by :meth:`to_json` (provenance filled in if missing)."""
        prov = self.provenance if self.provenance is not None else _provenance(sensitivity=self.method)
        return {"schema": 1, "kind": KIND, "method": self.method, "scores": self.scores,
                "meta": self.meta, "provenance": prov}

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the report atomically (schema, kind, provenance)."""
        d = self.to_dict()
        self.provenance = d["provenance"]
        atomic_write_json(path, d)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], where: str = "sensitivity report") -> "SensitivityReport":
        """Inverse of :meth:`to_dict`; ArtifactError for another kind or schema."""
        from mpsearch.schemas import SensitivityFile, validate

        validate(SensitivityFile, obj, where)
        return cls(scores=dict(obj["scores"]), method=str(obj.get("method") or ""), meta=dict(obj.get("meta") or {}),
                   provenance=dict(obj.get("provenance") or {}))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> "SensitivityReport":
        """Read a report written by :meth:`to_json`; refuses other kinds and schemas (ArtifactError)."""
        from mpsearch.schemas import SensitivityFile, read_json_artifact

        obj, _ = read_json_artifact(path, SensitivityFile)
        return cls.from_dict(obj, where=str(path))


def spearman(a: SensitivityReport, b: SensitivityReport, fmt: str | None = None,
             layers: Iterable[str] | None = None) -> float:
    """Spearman rank correlation of two reports over their common (layer, format) scores.

    ``fmt`` keeps one format (how the two rank the layers for it); ``layers`` keeps some layers
    (e.g. one group). Pairs where both reports score exactly 0 (the model's own precision, dead
    layers) are left out: they would agree trivially. NaN if fewer than 3 pairs remain or a
    side is constant.

    Example:
        >>> a = SensitivityReport({"x": {"f": 1.0}, "y": {"f": 2.0}, "z": {"f": 3.0}})
        >>> b = SensitivityReport({"x": {"f": 10.0}, "y": {"f": 30.0}, "z": {"f": 20.0}})
        >>> spearman(a, b)
        0.5
    """
    xs, ys = paired_scores(a, b, fmt=fmt, layers=layers)
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


def paired_scores(a: SensitivityReport, b: SensitivityReport, fmt: str | None = None,
                  layers: Iterable[str] | None = None) -> tuple[list[float], list[float]]:
    """The common (layer, format) scores of two reports, as two aligned lists (see :func:`spearman`)."""
    keep = None if layers is None else set(layers)
    xs: list[float] = []
    ys: list[float] = []
    for name, per in a.scores.items():
        if (keep is not None and name not in keep) or name not in b.scores:
            continue
        for f, x in per.items():
            if (fmt is not None and f != fmt) or f not in b.scores[name]:
                continue
            y = b.scores[name][f]
            if x == 0 and y == 0:
                continue
            xs.append(x)
            ys.append(y)
    return xs, ys


def agreement(a: SensitivityReport, b: SensitivityReport,
              layers: Sequence[Any] | Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Spearman correlations by group (``"all"`` first) and format (``"all"`` = every pair).

    Groups come from ``layers`` or either report's ``meta['groups']``.

    Example:
        >>> a = SensitivityReport({"x": {"f": 1.0}, "y": {"f": 2.0}, "z": {"f": 3.0}})
        >>> agreement(a, a, {"x": "vision", "y": "vision", "z": "vision"})["vision"]["all"]
        1.0
    """
    try:
        group_of = a.group_of(layers)
    except MpsError:
        group_of = b.group_of(layers)
    common_fmts = [f for f in a.formats() if f in set(b.formats())]
    out: dict[str, dict[str, float]] = {}
    for group in ("all",) + GROUPS:
        names = None if group == "all" else [n for n, g in group_of.items() if g == group]
        if names is not None and not any(n in a.scores and n in b.scores for n in names):
            continue
        row = {"all": spearman(a, b, layers=names)}
        for f in common_fmts:
            row[f] = spearman(a, b, fmt=f, layers=names)
        out[group] = row
    return out


def _nan_low(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def _some(d: Mapping[str, Any]) -> str:
    names = list(d)[:3]
    return ", ".join(names) if names else "none"
