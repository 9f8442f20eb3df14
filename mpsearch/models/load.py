"""Loading a vision-language model: :func:`load_vlm` turns a name into ``(model, processor)``.

``"demo"`` (the model shipped in ``mpsearch/demo/``), ``"tiny:<arch>"`` (a tiny random model,
:mod:`mpsearch.models.tiny`), a local directory, or a Hugging Face hub id / cache entry.
Everything except ``tiny:`` goes through one code path: ``AutoModelForImageTextToText`` (or
the Auto class a remote-code checkpoint names) / ``AutoProcessor`` ``.from_pretrained``.

Failures are one-line :class:`~mpsearch.errors.MpsError` s that say what failed: a model found
nowhere (and where it was looked for), a revision that does not exist, a gated repository,
a file that cannot be read (permissions), a weights file or config that is corrupt or truncated
(in the cache or a local directory), or the loader's own error. Anything else (a bug) is not
caught.

Example:
    >>> model, processor = load_vlm("tiny:llava", dtype="float32")
    >>> model.training
    False
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.models.source import model_source, record_source
from mpsearch.models.tiny import TINY_ARCHS, build_tiny_vlm

__all__ = ["DEMO_DIR", "load_vlm"]

DEMO_DIR: Path = Path(__file__).resolve().parent.parent / "demo"

_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "auto": "auto",
}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """A torch dtype or ``"auto"`` (the checkpoint's own dtype; float32 for tiny models)."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise MpsError(f"dtype {dtype} is not supported; valid: float32, bfloat16, float16, auto")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise MpsError(f"unknown dtype {dtype!r}; valid: float32, bfloat16, float16, auto (or fp32/bf16/fp16)")
    return _DTYPES[key]


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MpsError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MpsError(f"device {device!r} requested but no CUDA device is available (torch.cuda.is_available() is False); use device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MpsError(f"device {device!r} requested but the MPS backend is not available; use device='cpu'")
    return dev


def _offline() -> bool:
    """HF offline mode, read from the environment now (huggingface_hub reads it only at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_vlm(
    name_or_path: str,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    *,
    load_processor: bool = True,
) -> tuple[nn.Module, Any]:
    """Load a vision-language model and its processor, in eval mode on ``device``.

    ``name_or_path``:
      * ``"demo"``: the model shipped in ``mpsearch/demo/`` (same code path as a directory);
      * ``"tiny:<arch>"``: a tiny seeded random model, see :data:`TINY_ARCHS`;
      * a local directory saved with ``save_pretrained``;
      * a Hugging Face hub id (downloaded or taken from the cache; ``HF_HUB_OFFLINE=1`` is
        honoured). Models that ship their own code (InternVL2/2.5 chat, InternLM-XComposer2)
        load through ``AutoModel`` only with ``trust_remote_code=True``.

    ``dtype``: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` (= ``None``: the
    checkpoint's dtype; float32 for tiny models) or a torch dtype. ``load_processor=False``
    returns ``(model, None)`` (enough for layer listing and latency). A missing model raises a
    one-line :class:`MpsError` saying where it was looked for.

    Example:
        >>> model, processor = load_vlm("tiny:llava", dtype="float32")
        >>> model.training, model_source(model)
        (False, 'tiny:llava')
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise MpsError(f"model name must be 'demo', 'tiny:<arch>', a directory or a hub id; got {name_or_path!r}")
    name = str(name_or_path).strip()
    torch_dtype = _parse_dtype(dtype)
    dev = _parse_device(device)
    if name.startswith("tiny:"):
        if revision is not None:
            raise MpsError(f"revision={revision!r} given for {name}: revisions apply to hub ids only")
        model, processor = build_tiny_vlm(name.removeprefix("tiny:"))
        if torch_dtype != "auto":
            model = model.to(torch_dtype)
        if not load_processor:
            processor = None
    elif name == "demo":
        if not (DEMO_DIR / "config.json").is_file():
            raise MpsError(
                f"the demo model is missing: {DEMO_DIR} has no config.json (its weights are not "
                f"trained/shipped yet); use 'tiny:llava', a local directory or a hub id instead"
            )
        model, processor = _load_pretrained(str(DEMO_DIR), torch_dtype, trust_remote_code, revision, load_processor)
        record_source(model, "demo", revision, path=str(DEMO_DIR))
    else:
        model, processor = _load_pretrained(name, torch_dtype, trust_remote_code, revision, load_processor)
    model = model.to(dev).eval()
    return model, processor


def _permission_message(exc: PermissionError, what: str) -> str:
    where = exc.filename or "a file"
    return (f"permission denied reading {where} while loading {what} ({exc.strerror or exc}): check its "
            f"permissions (ls -l) or copy the model to a directory you can read")


def _resolve_local(name: str, revision: str | None) -> str | None:
    """The directory ``name`` points at, None if ``name`` is a hub id; raises for bad paths."""
    path = Path(name).expanduser()
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    try:
        exists = path.exists()
        if exists and path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(path))
        is_dir = path.is_dir()
        has_config = is_dir and (path / "config.json").is_file()
    except PermissionError as exc:
        raise MpsError(_permission_message(exc, f"model directory {str(path)!r}")) from None
    if exists or looks_like_path:
        if not is_dir:
            what = "is not a directory" if exists else "does not exist"
            raise MpsError(
                f"model directory {str(path.resolve())!r} {what}; pass a directory saved with "
                f"save_pretrained (load_vlm('/path/to/dir') / `mpsearch <command> /path/to/dir`), a hub id, "
                f"'demo' or 'tiny:<arch>'"
            )
        if revision is not None:
            raise MpsError(f"revision={revision!r} given for local directory {name!r}: revisions apply to hub ids only")
        if not has_config:
            raise MpsError(f"model directory {str(path.resolve())!r} has no config.json: is it a save_pretrained folder?")
        return str(path)
    if not _HUB_ID_RE.match(name):
        raise MpsError(f"{name!r} is neither an existing directory nor a hub id like 'org/name'")
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (transformers wraps hub errors in OSError)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 8:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return out


def _not_found_message(source: str, offline: bool, exc: BaseException | None) -> str:
    state = ("HF_HUB_OFFLINE=1, so the hub was not asked" if offline
             else f"the hub could not serve it ({_first_line(exc)})" if exc is not None else "the hub has no such repository")
    return (
        f"model {source!r} not found: no local directory {str(Path(source).resolve())!r}, not in the "
        f"Hugging Face cache {_hub_cache()!r}, and {state}; point at a local copy with "
        f"load_vlm('/path/to/dir') or `mpsearch <command> /path/to/dir`"
    )


def _hub_error(exc: BaseException, source: str, revision: str | None, offline: bool, what: str) -> MpsError | None:
    """One line saying what failed when transformers / huggingface_hub could not give a file;
    None when ``exc`` is none of the known hub / file-system failures."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = _chain(exc)
    for err in chain:
        if isinstance(err, PermissionError):
            return MpsError(_permission_message(err, what))
    for err in chain:
        if isinstance(err, RevisionNotFoundError) or "is not a valid git identifier" in str(err):
            return MpsError(
                f"revision {revision!r} of {source!r} does not exist (no such branch, tag or commit); see the "
                f"revisions on https://huggingface.co/{source} or leave revision out for the default branch"
            )
        if isinstance(err, GatedRepoError):
            return MpsError(
                f"{source!r} is a gated repository: accept its terms on https://huggingface.co/{source} and log in "
                f"(`hf auth login`, or set HF_TOKEN), or point at a local copy"
            )
        if isinstance(err, RepositoryNotFoundError):
            return MpsError(_not_found_message(source, offline, None) + "; a private repository needs a token "
                            "(`hf auth login`, or set HF_TOKEN)")
        if isinstance(err, (LocalEntryNotFoundError, EntryNotFoundError)):
            return MpsError(_not_found_message(source, offline, err))
        if isinstance(err, HfHubHTTPError):
            return MpsError(_not_found_message(source, offline, err))
    return None


def _read_config(source: str, revision: str | None, offline: bool) -> tuple[dict[str, Any], Path]:
    """config.json of a directory / hub id as a dict, and where it lies; a one-line MpsError if
    it cannot be had (not found, bad revision, gated, unreadable, corrupt)."""
    from transformers.utils import cached_file

    try:
        path = cached_file(source, "config.json", revision=revision, local_files_only=offline)
    except (OSError, ValueError) as exc:  # transformers turns every hub failure into OSError
        what = f"the config of model {source!r}"
        raise (_hub_error(exc, source, revision, offline, what)
               or MpsError(f"could not read {what}: {_first_line(exc)}")) from None
    if path is None:
        raise MpsError(f"model {source!r} has no config.json; point at a save_pretrained folder or hub id")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh), Path(path)
    except PermissionError as exc:
        raise MpsError(_permission_message(exc, f"the config of model {source!r}")) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MpsError(f"config.json of model {source!r} is corrupt ({path}: {_first_line(exc)}); "
                       f"{_redo_hint(Path(path))}") from None


def _redo_hint(path: Path) -> str:
    """How to get a good copy of a corrupt file: download it again, or save the model again."""
    if _hub_cache() in str(path) or "/snapshots/" in str(path):
        return (f"delete it from the Hugging Face cache (or load with force_download) so it is downloaded "
                f"again: rm {str(path)!r}")
    return "save the model again with save_pretrained, or copy a good version of the file"


def _corrupt_weights(folder: Path) -> tuple[Path, str] | None:
    """The first ``*.safetensors`` file in ``folder`` whose header cannot be read, and why."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as exc:
            return file, _first_line(exc)
    return None


def _model_loader(source: str, config: dict[str, Any], trust_remote_code: bool) -> Callable[..., Any]:
    """The transformers Auto class that loads this checkpoint (raises when it cannot)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = config.get("model_type")
    auto_map = config.get("auto_map") or {}
    if model_type in CONFIG_MAPPING and not (trust_remote_code and auto_map):
        if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise MpsError(
                f"{source}: model_type {model_type!r} is not a vision-language model (transformers "
                f"{transformers.__version__} has no image-text-to-text class for it)"
            )
        return transformers.AutoModelForImageTextToText
    if not auto_map:
        raise MpsError(
            f"{source}: model_type {model_type!r} is unknown to transformers {transformers.__version__} "
            f"and the checkpoint ships no code (no auto_map in config.json)"
        )
    if not trust_remote_code:
        raise MpsError(
            f"{source} ships its own modelling code (model_type {model_type!r}); loading it runs that code: "
            f"pass trust_remote_code=True (CLI: --trust-remote-code) if you trust this repository"
        )
    for auto in ("AutoModelForImageTextToText", "AutoModel", "AutoModelForCausalLM"):
        if auto in auto_map:
            return getattr(transformers, auto)
    raise MpsError(f"{source}: its auto_map {sorted(auto_map)} names no AutoModel class mpsearch can load")



def _load_pretrained(
    name: str, torch_dtype: torch.dtype | str, trust_remote_code: bool, revision: str | None, load_processor: bool
) -> tuple[nn.Module, Any]:
    """The single code path for directories, the demo folder and hub ids."""
    from safetensors import SafetensorError

    offline = _offline()
    source = _resolve_local(name, revision) or name
    config, config_path = _read_config(source, revision, offline)
    loader = _model_loader(source, config, trust_remote_code)
    if trust_remote_code and config.get("auto_map"):
        warnings.warn(f"trust_remote_code=True: running the modelling code shipped by {source!r}", stacklevel=3)
    kwargs: dict[str, Any] = {"revision": revision, "local_files_only": offline, "trust_remote_code": trust_remote_code}
    what = f"model {source!r}"
    try:
        model = loader.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except MpsError:
        raise
    except SafetensorError as exc:
        bad = _corrupt_weights(config_path.parent)
        file, why = bad if bad is not None else (config_path.parent, _first_line(exc))
        raise MpsError(f"the weights of {what} are corrupt or truncated: {file}: {why}; {_redo_hint(Path(file))}") from None
    except PermissionError as exc:
        raise MpsError(_permission_message(exc, what)) from None
    except OSError as exc:
        hub = _hub_error(exc, source, revision, offline, what)
        raise (hub or MpsError(f"could not load {what} with {loader.__name__}: {_first_line(exc)}")) from None
    except (ValueError, KeyError, ImportError, RuntimeError) as exc:  # the loader's own one-line reasons
        raise MpsError(f"could not load {what} with {loader.__name__}: {_first_line(exc)}") from None
    processor = _load_processor(source, kwargs, revision, offline) if load_processor else None
    record_source(model, name, revision, commit=getattr(model.config, "_commit_hash", None),
                  trust_remote_code=trust_remote_code)
    return model, processor


def _load_processor(source: str, kwargs: dict[str, Any], revision: str | None, offline: bool) -> Any:
    from transformers import AutoProcessor

    hint = "load_vlm(..., load_processor=False) loads the model alone"
    what = f"the processor of {source!r}"
    try:
        return AutoProcessor.from_pretrained(source, **kwargs)
    except PermissionError as exc:
        raise MpsError(_permission_message(exc, what)) from None
    except OSError as exc:
        hub = _hub_error(exc, source, revision, offline, what)
        raise (hub or MpsError(f"could not load {what}: {_first_line(exc)}; {hint}")) from None
    except (ValueError, KeyError, ImportError, TypeError, json.JSONDecodeError) as exc:
        raise MpsError(f"could not load {what}: {_first_line(exc)}; {hint}") from None
