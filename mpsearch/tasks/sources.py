"""Where a benchmark's rows come from: local copies, the hub cache, ``datasets`` (hub or offline).

Where data comes from (first that has the split wins, and :attr:`Benchmark.source` says which):

1. ``path`` given: a local directory (see :func:`local_segments` for the layouts), or a hub id
   such as ``"MMMU/MMMU"`` when no such directory exists and it reads ``owner/name``;
2. no path: a snapshot of the hub repository in the hub cache (``HF_HUB_CACHE``, what
   ``huggingface-cli download`` or an earlier run left), read from its parquet files;
3. ``datasets.load_dataset(hub_id, config, split=...)``: the hub, or the datasets cache when
   offline. Before asking the hub, the endpoint is probed (3 s); when unreachable the load runs
   in offline mode (cache only) and says so in a warning, instead of retrying for minutes.

Example:
    >>> is_hub_id("MMMU/MMMU"), is_hub_id("./data/mmmu")
    (True, False)
"""
from __future__ import annotations

import contextlib
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from mpsearch.errors import MpsError

LOCAL_LAYOUTS = (
    "DIR saved with datasets.save_to_disk as one DatasetDict (DIR/dataset_dict.json) whose split "
    "holds every subject; "
    "DIR/<Subject>/ one DatasetDict per subject (DIR/Art/dataset_dict.json, ...); "
    "DIR/<split>/ or DIR/<Subject>/<split>/ a saved Dataset; "
    "DIR a saved Dataset (taken as the split asked for); "
    "a snapshot of the hub repository (parquet files named <split>-*.parquet, per subject folder or not)"
)


# --------------------------------------------------------------------------- datasets plumbing
def _datasets() -> Any:
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise MpsError("the 'datasets' package is needed to load benchmarks: pip install datasets") from None
    return datasets


def _split_of_dict(dd: Any, split: str, where: str) -> Any:
    if split not in dd:
        raise MpsError(f"{where}: no split {split!r}; it has {sorted(dd.keys())}")
    return dd[split]


def local_segments(path: Path, split: str) -> list[tuple[str | None, Any, str]]:
    """Datasets for ``split`` under a local directory: ``[(folder hint, Dataset, where)]``.

    The hint is the name of the per-subject folder when the layout has one (else None).
    Layouts accepted: see :data:`LOCAL_LAYOUTS`. Raises :class:`MpsError` naming the directory
    and the layouts when none matches.
    """
    ds_mod = _datasets()
    path = Path(path)
    if not path.is_dir():
        raise MpsError(f"{path}: no such directory (pass a directory saved with datasets.save_to_disk, or a hub id)")

    def load(p: Path) -> Any:
        try:
            return ds_mod.load_from_disk(str(p))
        except Exception as exc:  # corrupt or foreign directory
            raise MpsError(f"{p}: cannot be read with datasets.load_from_disk ({type(exc).__name__}: {exc})") from None

    if (path / "dataset_dict.json").is_file():
        return [(None, _split_of_dict(load(path), split, str(path)), str(path))]
    if (path / split / "state.json").is_file():
        return [(None, load(path / split), str(path / split))]
    if (path / "state.json").is_file():
        return [(None, load(path), str(path))]
    out: list[tuple[str | None, Any, str]] = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        if (sub / "dataset_dict.json").is_file():
            dd = load(sub)
            if split in dd:
                out.append((sub.name, dd[split], str(sub)))
        elif (sub / split / "state.json").is_file():
            out.append((sub.name, load(sub / split), str(sub / split)))
    if out:
        return out
    out = _parquet_segments(path, split)
    if out:
        return out
    raise MpsError(f"{path}: no split {split!r} found; accepted layouts: {LOCAL_LAYOUTS}")


def _parquet_segments(root: Path, split: str) -> list[tuple[str | None, Any, str]]:
    files = sorted(root.rglob(f"{split}-*.parquet")) + sorted(root.rglob(f"{split}/*.parquet"))
    if not files:
        return []
    ds_mod = _datasets()
    groups: dict[Path, list[str]] = {}
    for f in files:
        groups.setdefault(f.parent, []).append(str(f))
    out: list[tuple[str | None, Any, str]] = []
    for parent, fs in sorted(groups.items()):
        ds = ds_mod.load_dataset("parquet", data_files={split: sorted(set(fs))}, split=split)
        hint = parent.name if parent != root and parent.name not in (split, "data") else None
        out.append((hint, ds, str(parent)))
    return out


def hub_cache_dir() -> str:
    """The hub cache folder (``HF_HUB_CACHE``)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        return os.path.expanduser("~/.cache/huggingface/hub")


def datasets_cache_dir() -> str:
    """The datasets cache folder (``HF_DATASETS_CACHE``)."""
    return str(_datasets().config.HF_DATASETS_CACHE)


def hub_snapshot_segments(repo_id: str, split: str) -> list[tuple[str | None, Any, str]]:
    """Parquet segments of ``split`` in the newest hub-cache snapshot of dataset ``repo_id`` ([] if none)."""
    root = Path(hub_cache_dir()) / ("datasets--" + repo_id.replace("/", "--")) / "snapshots"
    if not root.is_dir():
        return []
    for snap in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True):
        segs = _parquet_segments(snap, split)
        if segs:
            return segs
    return []


def _offline_env() -> bool:
    try:
        return bool(_datasets().config.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint answers a TCP connection within ``timeout`` seconds.

    Skipped (True) when a proxy is configured: the proxy decides.
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_mode(on: bool) -> Iterator[None]:
    """Temporarily force the hub libraries into offline mode (cache only)."""
    if not on:
        yield
        return
    ds_mod = _datasets()
    from huggingface_hub import constants

    old = (ds_mod.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    ds_mod.config.HF_HUB_OFFLINE = True
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        ds_mod.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = old


class HubState:
    """Decides once per load whether to ask the hub or stay on the cache (see :func:`hub_reachable`)."""

    def __init__(self) -> None:
        self.offline_env = _offline_env()
        self._reachable: bool | None = None

    @property
    def offline(self) -> bool:
        if self.offline_env:
            return True
        if self._reachable is None:
            self._reachable = hub_reachable()
            if not self._reachable:
                warnings.warn("the Hugging Face hub is unreachable: looking in the local datasets cache only",
                              stacklevel=3)
        return not self._reachable

    def describe(self) -> str:
        if self.offline_env:
            return "offline mode: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set"
        if self._reachable is False:
            return "hub unreachable"
        return "online"


class NotFound(Exception):
    """Internal: a hub/cache load found nothing (turned into one MpsError by the caller)."""


def load_hub_config(repo_id: str, config: str | None, split: str, hub: HubState) -> Any:
    """``datasets.load_dataset(repo_id, config, split=split)``, offline when the hub is out of reach.

    Raises :class:`NotFound` when neither the hub nor the cache has it, :class:`MpsError` for an
    unknown split or config.
    """
    ds_mod = _datasets()
    with _offline_mode(hub.offline):
        try:
            return ds_mod.load_dataset(repo_id, config, split=split)
        except ValueError as exc:
            msg = str(exc)
            if "split" in msg.lower() and "unknown" in msg.lower():
                raise MpsError(f"{repo_id}{'/' + config if config else ''}: no split {split!r} ({msg.splitlines()[0]})") from None
            if "BuilderConfig" in msg or "Config name" in msg:
                raise MpsError(f"{repo_id}: no config {config!r} ({msg.splitlines()[0]})") from None
            raise NotFound(msg) from None
        except (ConnectionError, FileNotFoundError, OSError) as exc:
            raise NotFound(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:  # DatasetNotFoundError and friends
            if type(exc).__name__ in ("DatasetNotFoundError", "LocalEntryNotFoundError", "EmptyDatasetError",
                                      "RepositoryNotFoundError", "HfHubHTTPError", "OfflineModeIsEnabled"):
                raise NotFound(f"{type(exc).__name__}: {exc}") from None
            raise


def not_found_message(name: str, repo_id: str, split: str, hub: HubState, path: Any = None) -> str:
    """The one-line 'where I looked and how to pass a local copy' message."""
    where = [f"path {path}"] if path is not None else []
    where += [f"hub {repo_id} ({hub.describe()})", f"hub cache {hub_cache_dir()}", f"datasets cache {datasets_cache_dir()}"]
    return (f"{name} split {split!r} not found; looked in: {'; '.join(where)}. Download it once where the hub is "
            f"reachable, or pass a local copy: load_benchmark({name!r}, {split!r}, path=DIR) / --data DIR "
            f"(a directory written by datasets.save_to_disk, or a snapshot of {repo_id})")


def is_hub_id(text: str) -> bool:
    """``owner/name`` with nothing path-like about it."""
    t = str(text)
    return t.count("/") == 1 and not t.startswith((".", "/", "~")) and all(p.strip() for p in t.split("/"))
