"""Precision policies and the precision-map YAML (DESIGN.md, "The precision map").

A :class:`Policy` says which format each ``nn.Linear`` of a model runs in: an explicit map
``formats`` (exact module paths), optional first-match glob ``rules`` for hand-written maps,
and a ``default`` for everything else. Exported maps are always fully expanded: every layer
listed explicitly, no rules, with metrics and provenance in the header.

Example:
    >>> p = Policy({"model.language_model.layers.0.mlp.down_proj": "bnb.nf4"}, default="bf16")
    >>> p.format_for("model.language_model.layers.0.mlp.down_proj"), p.format_for("lm_head")
    ('bnb.nf4', 'bf16')
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from mpsearch.hashing import json_key
from mpsearch._yaml import load_yaml
from mpsearch.artifacts import atomic_write_text, provenance as _provenance
from mpsearch.errors import MpsError
from mpsearch.schemas import PRECISION_MAP_SCHEMA  # the map's schema: mpsearch.schemas.PrecisionMapFile

#: Header fields a precision map may carry besides ``default``, ``layers`` and ``rules``; they
#: live in ``Policy.meta`` once loaded.
HEADER_FIELDS = ("model", "revision", "device", "workload", "metrics", "provenance")


def _known_format(name: str) -> bool:
    from mpsearch.formats import FORMATS

    return name in FORMATS


def _valid_formats() -> str:
    from mpsearch.formats import FORMATS

    return ", ".join(FORMATS)


@dataclass
class Policy:
    """Per-layer formats: explicit map, then first-match glob rules, then the default.

    Example:
        >>> p = Policy({}, default="fp32", rules=[("*.vision_tower.*", "torch.int8dyn")])
        >>> p.format_for("model.vision_tower.encoder.layers.0.mlp.fc1")
        'torch.int8dyn'
    """

    formats: dict[str, str] = field(default_factory=dict)
    default: str = "bf16"
    meta: dict[str, Any] = field(default_factory=dict)
    rules: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.formats = {str(k): str(v) for k, v in dict(self.formats).items()}
        self.rules = [(str(m), str(f)) for m, f in self.rules]

    # -- resolution ---------------------------------------------------------------------
    def format_for(self, layer: str) -> str:
        """The format of ``layer``: explicit entry, else first matching rule, else default."""
        if layer in self.formats:
            return self.formats[layer]
        for pattern, fmt in self.rules:
            if fnmatch.fnmatchcase(layer, pattern):
                return fmt
        return self.default

    def resolve(self, layer_names: Iterable[str]) -> "Policy":
        """An equivalent policy with every layer listed explicitly and no rules.

        Explicit entries for layers not in ``layer_names`` raise :class:`MpsError` (a map for
        another model). Example:
            >>> Policy({}, "fp32", rules=[("a*", "bf16")]).resolve(["ab", "c"]).formats
            {'ab': 'bf16', 'c': 'fp32'}
        """
        names = list(layer_names)
        known = set(names)
        unknown = [n for n in self.formats if n not in known]
        if unknown:
            raise MpsError(_unknown_layers_message(unknown, names))
        return Policy({n: self.format_for(n) for n in names}, self.default, dict(self.meta), [])

    def used_formats(self) -> set[str]:
        """Every format this policy can assign (explicit, rules, default)."""
        return set(self.formats.values()) | {f for _, f in self.rules} | {self.default}

    def key(self) -> str:
        """Stable short hash of what the policy assigns (entries equal to the default are ignored).

        Two policies that put every layer in the same format have the same key, whether they
        list layers explicitly or lean on the default.
        """
        explicit = {k: v for k, v in sorted(self.formats.items()) if v != self.default}
        return json_key({"default": self.default, "formats": explicit, "rules": self.rules}, n=12)

    @property
    def label(self) -> str:
        """A short human label (``meta["label"]``, else the key)."""
        return str(self.meta.get("label") or self.key())

    @classmethod
    def uniform(cls, fmt: str, layer_names: Iterable[str] = (), **meta: Any) -> "Policy":
        """Every layer in ``fmt``. Example: ``Policy.uniform("bnb.nf4", names, label="all-nf4")``."""
        meta.setdefault("label", f"uniform {fmt}")
        return cls({n: fmt for n in layer_names}, default=fmt, meta=dict(meta))

    # -- plain dicts --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (used inside front/results files)."""
        out: dict[str, Any] = {"default": self.default, "layers": dict(self.formats)}
        if self.rules:
            out["rules"] = [{"match": m, "format": f} for m, f in self.rules]
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Policy":
        """Inverse of :meth:`to_dict`."""
        rules = [(r["match"], r["format"]) for r in d.get("rules", [])]
        return cls(dict(d.get("layers", {})), str(d.get("default", "bf16")), dict(d.get("meta", {})), rules)

    # -- YAML precision map -------------------------------------------------------------
    def to_yaml(self, path: str | Path, layer_names: Iterable[str] | None = None, **header: Any) -> None:
        """Write the precision map, fully expanded, atomically.

        ``layer_names`` (all Linear layers of the model) expands rules and the default into an
        explicit map; without it the policy must have no rules. ``header`` fields (model,
        revision, device, workload, metrics, provenance) override those in ``meta``;
        provenance is completed with library versions and the creation time.

        Example:
            >>> Policy({"lm_head": "bf16"}, "bnb.nf4").to_yaml("/tmp/p.yaml", model="demo")
        """
        pol = self.resolve(layer_names) if layer_names is not None else self
        if pol.rules:
            raise MpsError("cannot export a precision map with rules unexpanded: pass layer_names (the model's Linear layers)")
        unknown = sorted(f for f in pol.used_formats() if not _known_format(f))
        if unknown:
            raise MpsError(f"unknown format(s) {unknown}; valid: {_valid_formats()}")
        meta = {**self.meta, **header}
        doc: dict[str, Any] = {"mpsearch": PRECISION_MAP_SCHEMA}
        for key in ("model", "revision", "device", "workload"):
            doc[key] = meta.get(key)
        doc["default"] = pol.default
        doc["layers"] = dict(pol.formats)
        doc["metrics"] = dict(meta.get("metrics") or {})
        prov = dict(meta.get("provenance") or {})
        fresh = _provenance()
        for k, v in fresh.items():
            prov.setdefault(k, v)
        if "label" in meta:
            prov.setdefault("label", meta["label"])
        doc["provenance"] = prov
        text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)
        atomic_write_text(path, text)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Policy":
        """Read a precision map strictly (safe loader).

        Unknown keys, unknown formats, a missing or other schema version and malformed values
        raise :class:`ArtifactError` naming the file, line and field. Example:
            >>> Policy.from_yaml("/tmp/p.yaml").format_for("lm_head")
            'bf16'
        """
        from mpsearch.schemas import PrecisionMapFile, validate

        data, lines = load_yaml(path)
        doc = validate(PrecisionMapFile, data, path, lines)
        layers = data.get("layers") or {}
        rules = [(r.match, r.format) for r in doc.rules or []]
        default = doc.default
        meta = {k: data[k] for k in HEADER_FIELDS if data.get(k) is not None}
        label = (data.get("provenance") or {}).get("label")
        if label:
            meta["label"] = label
        return cls({str(k): str(v) for k, v in layers.items()}, str(default), meta, rules)


def _unknown_layers_message(unknown: list[str], names: list[str]) -> str:
    import difflib

    first = unknown[0]
    near = difflib.get_close_matches(first, names, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
    return f"unknown layer {first!r}{hint}{more}: not a Linear layer of this model ({len(names)} layers; see `mpsearch layers MODEL`)"
