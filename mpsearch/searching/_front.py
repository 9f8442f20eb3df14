"""Candidates, Pareto filtering and front files (``{"schema": 1, "kind": "front", ...}``).

Example:
    >>> from mpsearch.policy import Policy
    >>> a = Candidate(Policy({"l": "fp32"}), 0.0, 10.0, 400, "uniform fp32")
    >>> b = Candidate(Policy({"l": "torch.int8dyn"}), 1.0, 4.0, 100, "ilp")
    >>> [c.source for c in pareto([a, b], ("proxy_loss", "predicted_latency_ms"))]
    ['uniform fp32', 'ilp']
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from mpsearch.artifacts import atomic_write_json, provenance
from mpsearch.policy import Policy

FRONT_KIND = "front"


@dataclass
class Candidate:
    """One policy with its proxy (and, after refine, measured) numbers.

    ``source`` says where it came from: ``"ilp"``, ``"ilp front"``, ``"uniform fp32"``,
    ``"trial 17"``, ``"refine trial 4"``. ``kl`` and ``measured_latency_ms`` are set by refine.

    Example:
        >>> c = Candidate(Policy({"l": "fp32"}), 0.0, 10.0, 400, "uniform fp32")
        >>> Candidate.from_dict(c.to_dict()).predicted_latency_ms
        10.0
    """

    policy: Policy
    proxy_loss: float
    predicted_latency_ms: float | None
    memory_bytes: int | None
    source: str = ""
    kl: float | None = None
    measured_latency_ms: float | None = None
    trial: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The policy's stable key."""
        return self.policy.key()

    def value(self, name: str) -> float:
        """A numeric field by name (``proxy_loss``, ``predicted_latency_ms``, ``memory_bytes``, ``kl``, ...)."""
        v = getattr(self, name)
        return math.inf if v is None else float(v)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (the policy inlined with :meth:`Policy.to_dict`)."""
        out: dict[str, Any] = {
            "key": self.key,
            "label": self.policy.label,
            "source": self.source,
            "proxy_loss": self.proxy_loss,
            "predicted_latency_ms": self.predicted_latency_ms,
            "memory_bytes": self.memory_bytes,
        }
        for name in ("kl", "measured_latency_ms", "trial"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.meta:
            out["meta"] = self.meta
        out["policy"] = self.policy.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        """Inverse of :meth:`to_dict`."""
        return cls(
            policy=Policy.from_dict(d["policy"]),
            proxy_loss=float(d["proxy_loss"]) if d.get("proxy_loss") is not None else math.nan,
            predicted_latency_ms=None if d.get("predicted_latency_ms") is None else float(d["predicted_latency_ms"]),
            memory_bytes=None if d.get("memory_bytes") is None else int(d["memory_bytes"]),
            source=str(d.get("source", "")),
            kl=None if d.get("kl") is None else float(d["kl"]),
            measured_latency_ms=None if d.get("measured_latency_ms") is None else float(d["measured_latency_ms"]),
            trial=d.get("trial"),
            meta=dict(d.get("meta") or {}),
        )


class Front(list):
    """A list of :class:`Candidate` with the run's metadata (``meta``) and failed trials (``failures``).

    Example:
        >>> f = Front([], meta={"budget_ms": 5.0})
        >>> f.meta["budget_ms"], f.failures
        (5.0, [])
    """

    def __init__(self, items: Iterable[Candidate] = (), meta: dict[str, Any] | None = None,
                 failures: list[dict[str, Any]] | None = None) -> None:
        super().__init__(items)
        self.meta: dict[str, Any] = dict(meta or {})
        self.failures: list[dict[str, Any]] = list(failures or [])


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when ``a`` is no worse than ``b`` everywhere and better somewhere (minimisation).

    Example:
        >>> dominates((1.0, 2.0), (1.0, 3.0)), dominates((1.0, 3.0), (1.0, 3.0))
        (True, False)
    """
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def _finite_or_inf(v: Any) -> float:
    """Minimisation value: None and NaN (not measured, not evaluated) count as +inf."""
    if v is None:
        return math.inf
    v = float(v)
    return math.inf if math.isnan(v) else v


def pareto_indices(vectors: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated vectors (every coordinate minimised), in input order.

    The one Pareto filter of mpsearch (search, refine, the ILP front, the evo sampler's
    archive and the plots use it). None and NaN count as +inf, so an unevaluated value never
    shields a point; equal vectors are all kept.

    Example:
        >>> pareto_indices([(1, 5), (2, 2), (2, 3), (3, 1), (1, 5)])
        [0, 1, 3, 4]
    """
    vals = [tuple(_finite_or_inf(x) for x in v) for v in vectors]
    order = sorted(range(len(vals)), key=lambda i: vals[i])
    keep: list[int] = []
    kept: list[tuple[float, ...]] = []
    for i in order:  # lexicographic order: only an earlier vector can dominate a later one
        v = vals[i]
        if not any(dominates(k, v) for k in kept):
            keep.append(i)
            kept.append(v)
    return sorted(keep)


def pareto(candidates: Iterable[Candidate], objectives: Sequence[str]) -> list[Candidate]:
    """Non-dominated candidates for ``objectives`` (minimised), one per policy, sorted by them.

    Duplicates (same policy key) keep their first occurrence; equal objective vectors of
    different policies are all kept; a missing (None/NaN) value counts as +inf.

    Example:
        >>> a = Candidate(Policy({"l": "fp32"}), 0.0, 10.0, 400, "a")
        >>> b = Candidate(Policy({"l": "bnb.nf4"}), 1.0, 10.0, 100, "b")
        >>> [c.source for c in pareto([a, b], ("proxy_loss", "predicted_latency_ms"))]
        ['a']
    """
    seen: set[str] = set()
    uniq: list[Candidate] = []
    for c in candidates:
        if c.key not in seen:
            seen.add(c.key)
            uniq.append(c)
    vals = [tuple(c.value(o) for o in objectives) for c in uniq]
    keep = [uniq[i] for i in pareto_indices(vals)]
    return sorted(keep, key=lambda c: tuple(_finite_or_inf(c.value(o)) for o in objectives))


def write_front(path: str | Path, front: Sequence[Candidate], **header: Any) -> None:
    """Write a front file atomically: schema, kind, header fields, provenance, candidates.

    Example:
        >>> write_front("/tmp/front.json", [], budget_ms=5.0)
        >>> read_front("/tmp/front.json").meta["budget_ms"]
        5.0
    """
    meta = dict(getattr(front, "meta", {}) or {})
    meta.update(header)
    prov = provenance(**dict(meta.pop("provenance", {}) or {}))
    doc: dict[str, Any] = {"schema": 1, "kind": FRONT_KIND}
    doc.update(meta)
    doc["provenance"] = prov
    failures = getattr(front, "failures", None)
    if failures:
        doc["failures"] = failures
    doc["candidates"] = [c.to_dict() for c in front]
    atomic_write_json(path, doc)


def read_front(path: str | Path) -> Front:
    """Read a front file (from ``search`` or ``refine``); foreign files raise :class:`ArtifactError`.

    Example:
        >>> front = read_front("front.json")                    # doctest: +SKIP
        >>> front[0].policy, front.meta["budget_ms"]            # doctest: +SKIP
    """
    from mpsearch.schemas import FrontFile, read_json_artifact

    doc, _ = read_json_artifact(path, FrontFile)  # the whole file checked: header, failures, candidates
    out = [Candidate.from_dict(c) for c in doc["candidates"]]
    meta = {k: v for k, v in doc.items() if k not in ("schema", "kind", "candidates", "failures")}
    return Front(out, meta=meta, failures=list(doc.get("failures") or []))
