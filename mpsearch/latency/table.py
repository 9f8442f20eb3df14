"""The latency table: a base term plus measured milliseconds per (layer, format).

``predict(policy) = base_ms + sum over layers of ms[layer][policy.format_for(layer)]``.
Tables are JSON artifacts (``schema``, ``kind: "latency"``, ``provenance`` with the device,
library versions, dtype, thread count, workload and model) and can be cached on disk under a
key made of everything that changes a measurement; a cached table measured for another device,
workload, layer set or library version is never used (see :func:`load_cached`).

Example:
    >>> from mpsearch.policy import Policy
    >>> t = LatencyTable(base_ms=2.0, ms={"a": {"fp32": 1.0, "torch.int8dyn": 0.5},
    ...                                   "b": {"fp32": 3.0, "torch.int8dyn": 1.0}})
    >>> t.predict(Policy({"a": "torch.int8dyn"}, default="fp32"))
    5.5
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from mpsearch.hashing import json_key
from mpsearch.artifacts import SCHEMA_VERSION, atomic_write_json, provenance
from mpsearch.errors import ArtifactError, MpsError

KIND = "latency"
#: Libraries whose version changes kernels, hence timings (part of the cache key).
TIMING_LIBRARIES = ("torch", "transformers", "bitsandbytes", "torchao", "mpsearch")


@dataclass
class LatencyTable:
    """Predicted latency of a policy: ``base_ms`` plus per-layer, per-format milliseconds.

    ``meta`` carries how it was measured (device, workload, method, token counts, correction).

    Example:
        >>> t = LatencyTable(1.0, {"lm_head": {"bf16": 0.25}})
        >>> t.formats(), t.layers()
        (['bf16'], ['lm_head'])
    """

    base_ms: float
    ms: dict[str, dict[str, float]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from mpsearch.schemas import LatencyValues, validate_object

        valid = validate_object(LatencyValues, {"base_ms": self.base_ms, "ms": self.ms}, "LatencyTable")
        self.base_ms = valid.base_ms
        self.ms = {layer: dict(row) for layer, row in valid.ms.items()}
        self.meta = dict(self.meta or {})

    # -- queries ------------------------------------------------------------------------
    @property
    def device(self) -> str | None:
        """The device the table was measured on (``meta["device"]``)."""
        return self.meta.get("device")

    def layers(self) -> list[str]:
        """Layer names, in table order."""
        return list(self.ms)

    def formats(self) -> list[str]:
        """Every format some layer has a time for, in first-seen order."""
        seen: dict[str, None] = {}
        for row in self.ms.values():
            for fmt in row:
                seen.setdefault(fmt, None)
        return list(seen)

    def layer_ms(self, layer: str, fmt: str) -> float:
        """Milliseconds of one layer in one format; :class:`MpsError` if not measured."""
        row = self.ms.get(layer)
        if row is None:
            raise MpsError(f"layer {layer!r} is not in the latency table ({len(self.ms)} layers; measured for another model?)")
        value = row.get(fmt)
        if value is None:
            raise MpsError(
                f"layer {layer!r}: format {fmt!r} has no latency in the table (measured: {', '.join(row)}); "
                "re-measure with a search space that offers it"
            )
        return value

    def predict(self, policy: Any) -> float:
        """Predicted end-to-end latency of ``policy`` in ms.

        Every table layer takes ``policy.format_for(layer)``; a format the table has no time
        for, or an explicit policy entry for a layer the table does not know, raises
        :class:`MpsError`.

        Example:
            >>> from mpsearch.policy import Policy
            >>> LatencyTable(1.0, {"x": {"fp32": 2.0}}).predict(Policy({}, default="fp32"))
            3.0
        """
        explicit = getattr(policy, "formats", {}) or {}
        if explicit:
            unknown = [n for n in explicit if n not in self.ms]
            if unknown:
                raise MpsError(
                    f"policy sets layer {unknown[0]!r} which the latency table does not have"
                    f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; was the table measured for this model?"
                )
        total = self.base_ms
        for layer, row in self.ms.items():
            fmt = policy.format_for(layer)
            value = row.get(fmt)
            if value is None:
                value = self.layer_ms(layer, fmt)
            total += value
        return total

    def uniform_ms(self, fmt: str, fallback: str | None = None) -> float:
        """Predicted ms with every layer in ``fmt`` (layers without it take ``fallback``)."""
        total = self.base_ms
        for layer, row in self.ms.items():
            if fmt in row:
                total += row[fmt]
            elif fallback is not None:
                total += self.layer_ms(layer, fallback)
            else:
                raise MpsError(f"layer {layer!r} has no time for {fmt!r} (measured: {', '.join(row)}); pass fallback=")
        return total

    # -- compatibility --------------------------------------------------------------------
    def mismatches(self, **expected: Any) -> list[str]:
        """Fields of ``meta["cache_key"]`` (device, workload, versions, ...) that differ from ``expected``."""
        key = self.meta.get("cache_key") or {}
        out = []
        for name, want in expected.items():
            have = key.get(name, self.meta.get(name))
            if _canon(have) != _canon(want):
                out.append(f"{name}: table has {_short(have)}, expected {_short(want)}")
        return out

    def require(self, **expected: Any) -> None:
        """Raise :class:`ArtifactError` if the table was measured for something else.

        Example:
            >>> t = LatencyTable(1.0, {"x": {"fp32": 1.0}}, meta={"device": "cpu: A"})
            >>> t.require(device="cpu: B")
            Traceback (most recent call last):
            ...
            mpsearch.errors.ArtifactError: latency table does not fit: device: table has 'cpu: A', expected 'cpu: B'
        """
        bad = self.mismatches(**expected)
        if bad:
            where = self.meta.get("path", "latency table")
            raise ArtifactError(f"{where} does not fit: {'; '.join(bad)}")

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON artifact as a dict (``schema``, ``kind``, ``base_ms``, ``ms``, ``meta``, ``provenance``)."""
        meta = {k: v for k, v in self.meta.items() if k not in ("provenance", "path")}
        prov = dict(self.meta.get("provenance") or {})
        fresh = provenance(device=self.device)
        for k, v in fresh.items():
            prov.setdefault(k, v)
        for k in ("device", "dtype", "threads", "workload", "model", "cuda", "driver"):
            if k in meta and k not in prov:
                prov[k] = meta[k]
        return {"schema": SCHEMA_VERSION, "kind": KIND, "base_ms": self.base_ms, "ms": self.ms,
                "meta": meta, "provenance": prov}

    def to_json(self, path: str | Path) -> None:
        """Write the table atomically. Example: ``table.to_json("latency.json")``."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], where: Any = "latency table") -> "LatencyTable":
        """Inverse of :meth:`to_dict`; malformed fields raise :class:`ArtifactError`."""
        from mpsearch.schemas import LatencyTableFile, validate

        validate(LatencyTableFile, obj, where)
        meta = dict(obj.get("meta") or {})
        if obj.get("provenance") is not None:
            meta["provenance"] = obj["provenance"]
        return cls(obj["base_ms"], obj["ms"], meta)

    @classmethod
    def from_json(cls, path: str | Path) -> "LatencyTable":
        """Read a table written by :meth:`to_json` (schema and kind checked).

        Example: ``LatencyTable.from_json("latency.json").predict(policy)``.
        """
        from mpsearch.schemas import LatencyTableFile, read_json_artifact

        obj, _ = read_json_artifact(path, LatencyTableFile)
        table = cls.from_dict(obj, where=path)
        table.meta["path"] = str(path)
        return table


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


# -- on-disk cache -------------------------------------------------------------------------
def cache_key_hash(key: Mapping[str, Any]) -> str:
    """Stable short hash of a cache key."""
    return json_key(dict(key))


def cache_path(cache_dir: str | Path, key: Mapping[str, Any]) -> Path:
    """Where the table for ``key`` lives in ``cache_dir``."""
    return Path(cache_dir) / f"latency-{cache_key_hash(key)}.json"


def load_cached(cache_dir: str | Path, key: Mapping[str, Any], log: Any = None) -> LatencyTable | None:
    """The cached table for ``key``, or None (with a message for each cached table that was refused).

    A table is used only if its stored key equals ``key`` in every field (device, dtype,
    threads, workload, method, layer shapes and formats, library versions). Tables in the folder
    measured for the same model and layers but another device, workload or library version are
    named in a message saying what differs, and are not used.
    """
    log = log or _stderr
    folder = Path(cache_dir)
    if not folder.is_dir():
        return None
    path = cache_path(folder, key)
    if path.is_file():
        try:
            table = LatencyTable.from_json(path)
        except ArtifactError as exc:
            log(f"latency cache: {exc}; not used, measuring again")
            return None
        bad = _key_diff(table.meta.get("cache_key") or {}, key)
        if not bad:
            log(f"latency cache: using {path} (measured {table.meta.get('provenance', {}).get('created', '?')} "
                f"on {table.device})")
            return table
        log(f"latency cache: {path} does not fit ({'; '.join(bad)}); not used, measuring again")
        return None
    for other in sorted(folder.glob("latency-*.json")):
        try:
            obj = json.loads(other.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        okey = (obj.get("meta") or {}).get("cache_key") or {}
        if okey.get("model") == key.get("model") and okey.get("layers") == key.get("layers"):
            bad = _key_diff(okey, key)
            log(f"latency cache: {other} was measured for another setting ({'; '.join(bad)}); not used, measuring")
    return None


def store_cached(cache_dir: str | Path, key: Mapping[str, Any], table: LatencyTable) -> Path:
    """Write ``table`` into the cache under ``key``; returns the path."""
    table.meta["cache_key"] = dict(key)
    path = cache_path(cache_dir, key)
    table.to_json(path)
    return path


def _key_diff(have: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    out = []
    for name in sorted(set(have) | set(want)):
        if _canon(have.get(name)) != _canon(want.get(name)):
            out.append(f"{name}: cached {_short(have.get(name))}, now {_short(want.get(name))}")
    return out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def library_key(versions: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The versions of :data:`TIMING_LIBRARIES` (from ``mpsearch.artifacts.library_versions``)."""
    if versions is None:
        from mpsearch.artifacts import library_versions

        versions = library_versions()
    return {k: versions.get(k) for k in TIMING_LIBRARIES}


def rows_total(table: LatencyTable, layers: Iterable[str], fmt: str) -> float:
    """Sum of the ``fmt`` times of ``layers`` (helper for summaries)."""
    return sum(table.layer_ms(n, fmt) for n in layers)


__all__ = ["LatencyTable", "load_cached", "store_cached", "cache_path", "cache_key_hash", "library_key", "KIND"]
