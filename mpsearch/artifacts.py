"""Artifact plumbing shared by every stage: schema version, provenance, atomic writes.

Every file mpsearch writes carries ``schema`` (an int) and ``provenance`` (who made it, with
which libraries, on which device, from which seed). Files are written atomically: to a
temporary file in the same folder, fsynced, then renamed over the target, so a crash never
leaves a half-written artifact. Readers refuse a schema they do not know.

Example:
    >>> from mpsearch.artifacts import atomic_write_json, read_json
    >>> atomic_write_json("/tmp/x.json", {"schema": 1, "kind": "demo"})
    >>> read_json("/tmp/x.json", kind="demo")["schema"]
    1
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Mapping

from mpsearch.errors import ArtifactError

SCHEMA_VERSION = 1


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries whose behaviour changes results (None if not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("mpsearch", "torch", "transformers", "bitsandbytes", "optuna", "datasets", "torchao"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["mpsearch"] is None:
        from mpsearch import __version__

        out["mpsearch"] = __version__
    return out


def utc_now() -> str:
    """Current UTC time, ISO 8601 with a trailing Z, second resolution."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def provenance(**extra: Any) -> dict[str, Any]:
    """Provenance block: library versions, creation time and whatever the caller adds.

    Example:
        >>> p = provenance(model="demo", seed=0)
        >>> p["model"], "torch" in p
        ('demo', True)
    """
    prov: dict[str, Any] = dict(library_versions())
    prov["created"] = utc_now()
    prov.update({k: v for k, v in extra.items()})
    return prov


#: CPU features that select different matmul kernels (int8 VNNI, bf16 dot products, AMX):
#: two CPUs with one marketing name ("AMD EPYC") and different sets time formats differently.
KERNEL_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


def parse_cpuinfo(text: str) -> dict[str, Any]:
    r"""Model name, family / model numbers and flags of the first processor in ``/proc/cpuinfo``.

    Example:
        >>> parse_cpuinfo("model name : AMD EPYC\ncpu family : 26\nmodel : 2\nflags : fpu avx512_vnni\n")
        {'model name': 'AMD EPYC', 'cpu family': '26', 'model': '2', 'flags': ['fpu', 'avx512_vnni']}
    """
    out: dict[str, Any] = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        key = "flags" if key == "Features" else key  # Arm's name for the flags
        if key in ("model name", "cpu family", "model", "flags") and key not in out:
            out[key] = value.split() if key == "flags" else value
    return out


def cpu_description(cpuinfo: Mapping[str, Any], capability: str | None, cores: int | None) -> str:
    """``cpu: <model name> (<cores> cores; family F model M; <ATen capability>; <kernel flags>)``.

    The family / model numbers and the kernel-relevant flags are part of the name because a
    latency table is keyed by it: "AMD EPYC" covers CPUs with and without int8 VNNI and bf16
    dot products, whose int8 and bf16 timings differ by several times.

    Example:
        >>> cpu_description({"model name": "AMD EPYC", "cpu family": "26", "model": "2",
        ...                  "flags": ["avx2", "avx512_vnni", "avx512_bf16"]}, "AVX512", 2)
        'cpu: AMD EPYC (2 cores; family 26 model 2; AVX512; avx512_vnni avx512_bf16)'
    """
    parts = [f"{cores} cores"]
    if cpuinfo.get("cpu family") is not None:
        parts.append(f"family {cpuinfo['cpu family']} model {cpuinfo.get('model', '?')}")
    if capability:
        parts.append(capability)
    flags = set(cpuinfo.get("flags") or ())
    kernel = [f for f in KERNEL_CPU_FLAGS if f in flags]
    if kernel:
        parts.append(" ".join(kernel))
    name = cpuinfo.get("model name") or platform.processor() or platform.machine()
    return f"cpu: {name} ({'; '.join(parts)})"


def device_name(device: Any = None) -> str:
    """Human-readable name of a device: the GPU's name, or the CPU with what picks its kernels.

    On CPU: model name, core count, family / model numbers, ATen's dispatch capability
    (``torch.backends.cpu.get_cpu_capability()``) and the flags in :data:`KERNEL_CPU_FLAGS`
    (see :func:`cpu_description`).
    """
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return _cpu_device_name()


@functools.lru_cache(maxsize=1)
def _cpu_device_name() -> str:
    """:func:`cpu_description` of this machine, read once per process (the CPU does not change)."""
    import torch

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            info = parse_cpuinfo(fh.read())
    except OSError:
        info = {}
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return cpu_description(info, capability, os.cpu_count())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON atomically, indented, keys in insertion order."""
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike[str], kind: str | None = None) -> dict[str, Any]:
    """Read a JSON artifact, refusing what it cannot read.

    Checks that the file exists, parses, is an object, has ``schema == SCHEMA_VERSION`` and,
    when ``kind`` is given, ``obj["kind"] == kind``. Raises :class:`ArtifactError` naming the
    file and the problem.
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p}: no such file")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{p}: expected a JSON object, found {type(obj).__name__}")
    check_header(obj, p, kind)
    return obj


def check_header(obj: Mapping[str, Any], where: Any, kind: str | None = None) -> None:
    """Check ``schema`` and ``kind`` of a parsed artifact; raise :class:`ArtifactError` if foreign."""
    if kind is not None and obj.get("kind") != kind:
        raise ArtifactError(f"{where}: field 'kind' is {obj.get('kind')!r}, expected {kind!r} (is this the right file?)")
    schema = obj.get("schema")
    if schema != SCHEMA_VERSION:
        raise ArtifactError(
            f"{where}: field 'schema' is {schema!r}; this mpsearch reads schema {SCHEMA_VERSION} only"
        )


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one JSON record as a line, flushed and fsynced (crash loses at most this record)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, allow_nan=True) + "\n"
    drop_torn_tail(p)
    with open(p, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def drop_torn_tail(path: str | os.PathLike[str]) -> None:
    """Cut an unterminated last line (a record torn by a crash mid-write), so the next append
    is not glued onto it."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return
    with open(p, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        data = p.read_bytes()
        fh.truncate(data.rfind(b"\n") + 1)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL file; a torn last line (crash mid-write) is ignored, any other bad line raises."""
    p = Path(path)
    if not p.exists():
        return []
    try:
        lines = p.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{p}: not a JSONL file (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn tail: the record in progress when the writer died
                continue
            raise ArtifactError(f"{p}:{i + 1}: not a JSON record") from None
    return out
