"""Evaluation results: the :class:`Result` record, the crash-safe JSONL store, reading policies.

Example:
    >>> from mpsearch.policy import Policy
    >>> r = Result(Policy({}, "fp32", {"label": "fp32"}), accuracy=0.5, accuracy_ci=(0.2, 0.8), n=4)
    >>> r.label
    'fp32'
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mpsearch.errors import ArtifactError, MpsError

__all__ = ["Result", "load_policies", "read_results", "RECORD_KIND"]

RECORD_KIND = "eval_result"


# --------------------------------------------------------------------------- the result
@dataclass
class Result:
    """One policy evaluated on one benchmark split.

    Example:
        >>> from mpsearch.policy import Policy
        >>> r = Result(Policy({}, "fp32", {"label": "fp32"}), accuracy=0.5, accuracy_ci=(0.2, 0.8), n=4)
        >>> Result.from_dict(r.to_dict()).accuracy_ci
        (0.2, 0.8)
    """

    policy: Any
    accuracy: float = 0.0
    accuracy_ci: tuple[float, float] = (0.0, 0.0)
    per_subject: dict[str, float] = field(default_factory=dict)
    per_skill: dict[str, float] = field(default_factory=dict)
    per_skill_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    per_skill_n: dict[str, int] = field(default_factory=dict)
    per_discipline: dict[str, float] = field(default_factory=dict)
    flips: float | None = None
    kl: float | None = None
    latency_ms: float | None = None
    memory_bytes: int | None = None
    predicted_latency_ms: float | None = None
    peak_memory_bytes: int | None = None
    n: int = 0
    n_skipped: int = 0
    fallbacks: int = 0
    mode: str = "logits"
    benchmark: str = ""
    split: str = ""
    limit: int | None = None
    label: str = ""
    baseline: bool = False
    per_subject_n: dict[str, int] = field(default_factory=dict)
    answers: dict[str, Any] = field(default_factory=dict)
    correct: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.label:
            meta = getattr(self.policy, "meta", {}) or {}
            self.label = str(meta.get("label") or (self.policy.key() if hasattr(self.policy, "key") else "policy"))
        self.accuracy_ci = (float(self.accuracy_ci[0]), float(self.accuracy_ci[1]))

    @property
    def policy_key(self) -> str:
        """The policy's stable hash."""
        return self.policy.key()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the policy as ``Policy.to_dict()``)."""
        d = asdict(self)
        d["policy"] = self.policy.to_dict()
        d["policy_key"] = self.policy.key()
        d["accuracy_ci"] = list(self.accuracy_ci)
        d["per_skill_ci"] = {k: list(v) for k, v in self.per_skill_ci.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Result":
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        from mpsearch.policy import Policy

        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["policy"] = Policy.from_dict(d["policy"])
        kwargs["accuracy_ci"] = tuple(d.get("accuracy_ci") or (0.0, 0.0))
        kwargs["per_skill_ci"] = {k: (float(v[0]), float(v[1])) for k, v in (d.get("per_skill_ci") or {}).items()}
        return cls(**kwargs)


# --------------------------------------------------------------------------- reading policies
def load_policies(path: str | Path) -> list[Any]:
    """Policies from a precision-map YAML, or from JSON: a front file
    (``{"schema": 1, "kind": "front", "candidates": [{"policy": {...}}, ...]}``), a list of
    candidates, or a list of policy dicts (``Policy.to_dict()``).

    Candidates without a label get ``pareto-<i>`` (their position in the file, from 1).

    Example:
        >>> load_policies("front.json")[0].meta["label"]  # doctest: +SKIP
        'pareto-1'
    """
    from mpsearch.policy import Policy

    p = Path(path)
    if not p.is_file():
        raise MpsError(f"{p}: no such file (--policies takes a precision-map YAML or a front/policy JSON)")
    if p.suffix.lower() in (".yaml", ".yml"):
        return [Policy.from_yaml(p)]
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{p}: not valid JSON ({exc}); --policies takes a precision-map YAML or a front JSON") from None
    if isinstance(obj, dict):
        if "candidates" not in obj:
            raise ArtifactError(f"{p}: a JSON object needs field 'candidates' (a front file: kind 'front')")
        from mpsearch.artifacts import check_header

        check_header(obj, p, kind=obj.get("kind") if obj.get("kind") in ("front", "candidates") else "front")
        items = obj["candidates"]
    elif isinstance(obj, list):
        items = obj
    else:
        raise ArtifactError(f"{p}: expected a front object or a list of policies, found {type(obj).__name__}")
    if not isinstance(items, list) or not items:
        raise ArtifactError(f"{p}: field 'candidates' must be a non-empty list")
    out = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise ArtifactError(f"{p}: candidate {i} is {type(item).__name__}, expected an object")
        d = item.get("policy", item)
        if not isinstance(d, dict) or ("layers" not in d and "default" not in d):
            raise ArtifactError(f"{p}: candidate {i}: field 'policy' must be a policy object with 'default' and 'layers'")
        try:
            pol = Policy.from_dict(d)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{p}: candidate {i}: not a policy ({exc})") from None
        pol.meta.setdefault("label", item.get("label") or f"pareto-{i}")
        for k in ("predicted_latency_ms", "proxy_loss", "memory_bytes"):
            if k in item and k not in pol.meta:
                pol.meta[k] = item[k]
        out.append(pol)
    return out


def read_results(path: str | Path) -> list[Result]:
    """Every result record of a results JSONL file (torn last line ignored; foreign records refused)."""
    from mpsearch.artifacts import read_jsonl
    from mpsearch.schemas import ResultRecord, validate

    out = []
    for i, rec in enumerate(read_jsonl(path), 1):
        validate(ResultRecord, rec, f"{path}:{i}")  # every record checked whole (mpsearch.schemas)
        out.append(Result.from_dict(rec["result"]))
    return out
