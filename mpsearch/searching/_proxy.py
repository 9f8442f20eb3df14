"""The additive proxy: a policy's predicted quality loss, latency and weight memory.

A :class:`ProxyProblem` turns (sensitivity report, latency table, search space, layers) into
arrays over the space's decisions: for decision ``d`` and its choice ``c``,
``loss[d][c]`` is the sum of the sensitivity scores of the decision's layers in that format,
``ms[d][c]`` the sum of their measured per-layer latencies and ``bytes[d][c]`` the exact
weight bytes those layers add in that format: with the model, from
:class:`mpsearch.formats.MemoryModel`, the code :func:`mpsearch.formats.policy_memory_bytes` runs
(each layer's dtype, biases in it, a tied head's shared embedding counted once, shared
storages once); without it, ``Format.storage_bytes`` of the layer shapes. A policy is one choice
index per decision; its predicted latency is ``ms_offset + sum(ms)`` where ``ms_offset`` is
chosen so that the sum agrees with ``LatencyTable.predict`` (checked on two policies: a
table that does not add up is refused, since the ILP would not be exact for it).

Example:
    >>> prob = ProxyProblem.build(sens, lat, space, layers)           # doctest: +SKIP
    >>> idx = prob.fastest(); prob.latency_ms(idx), prob.loss(idx)    # doctest: +SKIP
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mpsearch.errors import MpsError
from mpsearch.policy import Policy

#: Relative tolerance for the additivity check of a latency table.
_ADDITIVE_RTOL = 1e-6


@dataclass
class ProxyProblem:
    """Decisions of a search space with their per-choice loss, latency and memory arrays.

    Build with :meth:`build`; evaluate a policy given as one choice index per decision.
    ``bytes`` is None when layer shapes are unknown (no memory objective then).

    Example:
        >>> prob = ProxyProblem.build(sens, lat, space, layers)       # doctest: +SKIP
        >>> prob.evaluate(prob.fastest())                              # doctest: +SKIP
        (12.5, 3.1, 1048576)
    """

    decisions: list[Any]
    layer_names: list[str]
    loss_tab: list[np.ndarray]
    ms_tab: list[np.ndarray] | None
    bytes_tab: list[np.ndarray] | None
    ms_offset: float = 0.0
    bytes_offset: int = 0
    default: str = "bf16"
    space_name: str = ""
    memory_scope: str = "linear layers"
    meta: dict[str, Any] = field(default_factory=dict)
    lat: Any = field(default=None, repr=False)
    #: ``(bytes, [(decision, choice of the layer's current format)])`` per storage several
    #: searched Linear layers share: ``bytes_tab`` counts it once per such layer (an upper
    #: bound the ILP's budget rows keep), :meth:`memory_bytes` once (exact).
    shared: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)
    space: Any = field(default=None, repr=False)
    layers: list[Any] = field(default_factory=list, repr=False)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        sens: Any,
        lat: Any,
        space: Any,
        layers: Sequence[Any],
        model: Any = None,
    ) -> "ProxyProblem":
        """Arrays for ``layers`` under ``space`` from a SensitivityReport and a LatencyTable.

        ``lat`` may be None (memory-only search). ``model``, when given, makes memory the
        model's exact weight memory (:func:`mpsearch.formats.policy_memory_bytes`, the same
        :class:`mpsearch.formats.MemoryModel`); without it memory counts the Linear layers'
        ``storage_bytes`` (fp32) only. Missing scores or timings raise :class:`MpsError` naming
        the layer and format.
        """
        layers = list(layers)
        if not layers:
            raise MpsError("no layers to search: the model (or the sensitivity report) lists no Linear layers")
        decisions = space.decisions(layers)
        by_name = {l.name: l for l in layers}
        scores: Mapping[str, Mapping[str, float]] = getattr(sens, "scores", sens)
        loss_tab = [_decision_array(d, lambda n, f: _score(scores, n, f, sens)) for d in decisions]
        ms_tab = None
        if lat is not None:
            ms_tab = [_decision_array(d, lambda n, f: _timing(lat, n, f)) for d in decisions]
        bytes_tab = None
        mm = None
        shared: list[tuple[int, list[tuple[int, int]]]] = []
        if model is not None:
            from mpsearch.formats import MemoryModel

            mm = MemoryModel(model)
            missing = [n for n in by_name if n not in mm.slots]
            if missing:
                raise MpsError(f"layer {missing[0]!r} is not a Linear layer of the model given ({len(missing)} such layers)")
            bytes_tab = [_decision_array(d, lambda n, f: float(mm.layer_bytes(n, f)), dtype=np.int64) for d in decisions]
            where = {n: i for i, d in enumerate(decisions) for n in d.layers}
            for nbytes, names in mm.shared():
                members = [(where[n], decisions[where[n]].choices.index(mm.format_of(n)))
                           for n in names if n in where and mm.format_of(n) in decisions[where[n]].choices]
                if len(members) > 1:
                    shared.append((nbytes, members))
        elif all(int(getattr(l, "in_features", 0) or 0) > 0 for l in layers):
            bytes_tab = [_decision_array(d, lambda n, f: float(_storage_bytes(by_name[n], f)), dtype=np.int64) for d in decisions]
        prob = cls(
            decisions=decisions,
            layer_names=[l.name for l in layers],
            loss_tab=loss_tab,
            ms_tab=ms_tab,
            bytes_tab=bytes_tab,
            default=default_format(space),
            space_name=str(getattr(space, "name", "")),
            shared=shared,
            space=space,
            layers=layers,
        )
        if lat is not None:
            prob.ms_offset = prob._calibrate_latency(lat)
            prob.lat = lat
        if mm is not None:
            # everything outside the searched layers: non-Linear tensors, and Linear layers the
            # search does not set, in the policies' default (what apply_policy gives them)
            rest = [n for n in mm.slots if n not in by_name]
            prob.bytes_offset = mm.base_bytes + sum(mm.layer_bytes(n, prob.default) for n in rest)
            prob.memory_scope = "model"
            if rest and mm.shared():
                prob.bytes_offset = int(mm.total(prob.policy(prob.largest()))) - prob._table_bytes(prob.largest())
        return prob

    # -- sizes --------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of decisions (fixed ones included)."""
        return len(self.decisions)

    @property
    def free(self) -> list[int]:
        """Indices of decisions with more than one choice."""
        return [i for i, d in enumerate(self.decisions) if len(d.choices) > 1]

    def n_policies(self) -> int:
        """How many distinct policies the space allows (product of choice counts)."""
        return math.prod(len(d.choices) for d in self.decisions)

    # -- evaluation ---------------------------------------------------------------------
    def loss(self, idx: Sequence[int]) -> float:
        """Predicted quality loss: the sum of the chosen sensitivity scores."""
        return float(sum(self.loss_tab[d][c] for d, c in enumerate(idx)))

    def latency_ms(self, idx: Sequence[int]) -> float:
        """Predicted latency (ms): ``LatencyTable.predict`` of the policy, to the last bit.

        Budgets are checked with this value (what a user checks), not with the table sum
        :meth:`sum_ms`, which can differ in the last bits (summation order).
        """
        if self.lat is not None:
            return float(self.lat.predict(self.policy(idx)))
        return self.sum_ms(idx)

    def sum_ms(self, idx: Sequence[int]) -> float:
        """Predicted latency as ``ms_offset`` + the per-decision table sums (fast)."""
        if self.ms_tab is None:
            raise MpsError("no latency table given: a latency budget or objective needs --latency")
        return float(self.ms_offset + sum(self.ms_tab[d][c] for d, c in enumerate(idx)))

    def memory_bytes(self, idx: Sequence[int]) -> int | None:
        """Exact weight bytes (None when layer shapes are unknown): ``policy_memory_bytes`` of the policy."""
        if self.bytes_tab is None:
            return None
        return self._table_bytes(idx) - self._shared_excess(idx)

    def _table_bytes(self, idx: Sequence[int]) -> int:
        return int(self.bytes_offset + sum(int(self.bytes_tab[d][c]) for d, c in enumerate(idx)))  # type: ignore[index]

    def _shared_excess(self, idx: Sequence[int]) -> int:
        out = 0
        for nbytes, members in self.shared:
            kept = sum(1 for d, c in members if idx[d] == c)
            out += nbytes * max(kept - 1, 0)
        return out

    def evaluate(self, idx: Sequence[int]) -> tuple[float, float | None, int | None]:
        """``(loss, latency_ms or None, memory_bytes or None)`` of a policy."""
        ms = self.latency_ms(idx) if self.ms_tab is not None else None
        return self.loss(idx), ms, self.memory_bytes(idx)

    # -- special policies ---------------------------------------------------------------
    def fastest(self) -> list[int]:
        """The smallest-latency policy (ties broken by lower loss)."""
        if self.ms_tab is None:
            raise MpsError("no latency table given")
        return [int(np.lexsort((self.loss_tab[d], self.ms_tab[d]))[0]) for d in range(self.n)]

    def slowest(self) -> list[int]:
        """The largest-latency policy."""
        if self.ms_tab is None:
            raise MpsError("no latency table given")
        return [int(np.argmax(self.ms_tab[d])) for d in range(self.n)]

    def smallest(self) -> list[int]:
        """The smallest-memory policy (ties broken by lower loss)."""
        if self.bytes_tab is None:
            raise MpsError("layer shapes unknown: a memory budget needs the model (--model) or a report listing layer shapes")
        return [int(np.lexsort((self.loss_tab[d], self.bytes_tab[d]))[0]) for d in range(self.n)]

    def largest(self) -> list[int]:
        """The largest-memory policy."""
        if self.bytes_tab is None:
            raise MpsError("layer shapes unknown")
        return [int(np.argmax(self.bytes_tab[d])) for d in range(self.n)]

    def uniform(self, fmt: str) -> list[int] | None:
        """The choice vector of ``SearchSpace.uniform_policies``' policy for ``fmt``.

        ``fmt`` wherever a decision may take it, others their first choice; None when no free
        decision can take ``fmt``.
        """
        if not any(fmt in self.decisions[d].choices for d in self.free):
            return None
        if self.space is not None and hasattr(self.space, "uniform_policies") and self.layers:
            for p in self.space.uniform_policies(self.layers):
                if p.meta.get("format") == fmt:
                    return self.indices(p)
            return None
        return [d.choices.index(fmt) if fmt in d.choices else 0 for d in self.decisions]

    # -- conversions --------------------------------------------------------------------
    def policy(self, idx: Sequence[int], **meta: Any) -> Policy:
        """The :class:`Policy` of a choice vector, every layer listed explicitly."""
        formats: dict[str, str] = {}
        for d, c in zip(self.decisions, idx):
            for name in d.layers:
                formats[name] = d.choices[c]
        ordered = {n: formats[n] for n in self.layer_names}
        return Policy(ordered, default=self.default, meta=dict(meta))

    def indices(self, policy: Policy) -> list[int]:
        """The choice vector of a policy; raises if it breaks a tie or uses a format a layer may not take."""
        policy = policy.resolve(self.layer_names) if set(policy.formats) - set(self.layer_names) else policy
        out = []
        for d in self.decisions:
            fmts = {policy.format_for(n) for n in d.layers}
            if len(fmts) > 1:
                raise MpsError(f"policy {policy.label}: tie group {d.key} has mixed formats {sorted(fmts)}; tied layers take one format")
            (fmt,) = fmts
            if fmt not in d.choices:
                raise MpsError(
                    f"policy {policy.label}: layer {d.layers[0]} is {fmt!r}, not a candidate of search space "
                    f"{self.space_name!r} (valid: {', '.join(d.choices)})"
                )
            out.append(d.choices.index(fmt))
        return out

    def params(self, idx: Sequence[int]) -> dict[str, str]:
        """Optuna parameters (one categorical per free decision) of a choice vector."""
        return {self.decisions[d].key: self.decisions[d].choices[idx[d]] for d in self.free}

    def from_params(self, params: Mapping[str, Any]) -> list[int]:
        """Choice vector from Optuna parameters (missing free decisions raise)."""
        idx = []
        for d in self.decisions:
            if len(d.choices) == 1:
                idx.append(0)
                continue
            if d.key not in params:
                raise MpsError(f"trial parameters lack decision {d.key!r}")
            idx.append(d.choices.index(params[d.key]))
        return idx

    def summary(self, idx: Sequence[int]) -> str:
        """Short human summary: ``all torch.int8dyn except fp32: 2 (lm_head, ...)``."""
        return summarize_formats(self.policy(idx).formats)

    def group_counts(self, idx: Sequence[int]) -> dict[str, dict[str, int]]:
        """``{group: {format: number of layers}}`` of a choice vector."""
        out: dict[str, Counter] = {}
        for d, c in zip(self.decisions, idx):
            out.setdefault(d.group, Counter())[d.choices[c]] += len(d.layers)
        return {g: dict(sorted(cnt.items())) for g, cnt in out.items()}

    # -- calibration against the real tables ----------------------------------------------
    def _calibrate_latency(self, lat: Any) -> float:
        base = self.slowest()
        raw0 = float(sum(self.ms_tab[d][c] for d, c in enumerate(base)))  # type: ignore[index]
        offset = float(lat.predict(self.policy(base))) - raw0
        other = self.fastest()
        raw1 = float(sum(self.ms_tab[d][c] for d, c in enumerate(other)))  # type: ignore[index]
        pred1 = float(lat.predict(self.policy(other)))
        if abs(pred1 - (offset + raw1)) > _ADDITIVE_RTOL * max(1.0, abs(pred1)):
            raise MpsError(
                f"latency table does not add up: predict() of the fastest policy is {pred1:.6g} ms but "
                f"its per-layer sum is {offset + raw1:.6g} ms; the proxy search needs an additive table"
            )
        return offset


def _decision_array(decision: Any, value: Any, dtype: Any = np.float64) -> np.ndarray:
    return np.array([sum(value(n, f) for n in decision.layers) for f in decision.choices], dtype=dtype)


def _score(scores: Mapping[str, Mapping[str, float]], layer: str, fmt: str, sens: Any) -> float:
    row = scores.get(layer)
    if row is None:
        raise MpsError(
            f"sensitivity report has no scores for layer {layer!r} ({len(scores)} layers in the report): "
            "was it profiled on another model?"
        )
    if fmt not in row:
        raise MpsError(
            f"sensitivity report has no score for layer {layer!r} in format {fmt!r} (it has: {', '.join(row)}); "
            "profile with the same search space"
        )
    v = float(row[fmt])
    if not math.isfinite(v):
        raise MpsError(f"sensitivity report: score of layer {layer!r} in format {fmt!r} is {v}; scores must be finite")
    return v


def _timing(lat: Any, layer: str, fmt: str) -> float:
    row = lat.ms.get(layer)
    if row is None:
        raise MpsError(
            f"latency table has no timings for layer {layer!r} ({len(lat.ms)} layers in the table): "
            "was it measured on another model?"
        )
    if fmt not in row:
        raise MpsError(
            f"latency table has no timing for layer {layer!r} in format {fmt!r} (it has: {', '.join(row)}); "
            "measure with the same search space"
        )
    v = float(row[fmt])
    if not math.isfinite(v):
        raise MpsError(f"latency table: timing of layer {layer!r} in format {fmt!r} is {v}; timings must be finite")
    return v


def _storage_bytes(layer: Any, fmt: str) -> int:
    from mpsearch.formats import get_format

    return int(get_format(fmt).storage_bytes(int(layer.in_features), int(layer.out_features), bool(layer.bias)))


def default_format(space: Any) -> str:
    """The ``default`` of every policy the search makes: ``SearchSpace.default_format`` (one key per assignment)."""
    if hasattr(space, "default_format"):
        return str(space.default_format)
    fmts = space.formats() if hasattr(space, "formats") else []
    return fmts[0] if fmts else "bf16"


def summarize_formats(formats: Mapping[str, str], max_names: int = 3) -> str:
    """One-line summary of a layer -> format map: the majority format and the exceptions.

    Example:
        >>> summarize_formats({"a.q": "torch.int8dyn", "a.k": "torch.int8dyn", "lm_head": "fp32"})
        'all torch.int8dyn except fp32: lm_head'
    """
    if not formats:
        return "no layers"
    counts = Counter(formats.values())
    major, _ = counts.most_common(1)[0]
    if len(counts) == 1:
        return f"all {major} ({len(formats)} layers)"
    parts = []
    for fmt, cnt in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if fmt == major:
            continue
        names = [n for n, f in formats.items() if f == fmt]
        if len(names) <= max_names:
            parts.append(f"{fmt}: {', '.join(names)}")
        else:
            parts.append(f"{fmt}: {len(names)} layers ({', '.join(names[:2])}, ...)")
    return f"all {major} except " + "; ".join(parts)


def layers_from(items: Iterable[Any]) -> list[Any]:
    """:class:`mpsearch.models.Layer` list from Layer objects or dicts (``name``, ``group``, shapes optional).

    Example:
        >>> [l.name for l in layers_from([{"name": "fc", "group": "language"}])]
        ['fc']
    """
    from mpsearch.models import Layer

    out = []
    for it in items:
        if isinstance(it, Mapping):
            out.append(
                Layer(
                    name=str(it["name"]),
                    group=str(it["group"]),
                    in_features=int(it.get("in_features") or 0),
                    out_features=int(it.get("out_features") or 0),
                    bias=bool(it.get("bias", False)),
                    tie=it.get("tie"),
                    depth=it.get("depth"),
                )
            )
        else:
            out.append(it)
    return out
