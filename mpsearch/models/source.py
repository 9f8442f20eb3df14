"""Where a model came from: recorded by the loaders, read by provenance and cache keys.

Example:
    >>> from torch import nn
    >>> net = nn.Linear(2, 2)
    >>> record_source(net, "tiny:llava", None, seed=0)
    >>> model_source(net), model_info(net)["seed"]
    ('tiny:llava', 0)
"""
from __future__ import annotations

from typing import Any

from torch import nn

from mpsearch.errors import MpsError

__all__ = ["record_source", "model_info", "model_source", "model_label"]


def record_source(model: nn.Module, name: str, revision: str | None, **extra: Any) -> None:
    """Attach ``{"model": name, "revision": revision, **extra}`` to ``model`` (read by :func:`model_info`)."""
    info = {"model": name, "revision": revision}
    info.update(extra)
    object.__setattr__(model, "_mpsearch_source", info)


def model_info(model: nn.Module) -> dict[str, Any]:
    """Where a model came from: ``{"model", "revision", ...}`` as recorded by :func:`mpsearch.load_vlm`
    (``commit`` for hub models, ``seed`` for tiny ones, ``trust_remote_code``).

    Falls back to transformers' own ``config.name_or_path`` when the model was loaded another
    way; raises :class:`MpsError` if neither exists.

    Example:
        >>> from mpsearch.models import load_vlm
        >>> model_info(load_vlm("tiny:llava")[0])["model"]
        'tiny:llava'
    """
    info = getattr(model, "_mpsearch_source", None)
    if info is not None:
        return dict(info)
    name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if not name:
        raise MpsError(f"the source of this {type(model).__name__} is unknown: load it with mpsearch.load_vlm")
    return {"model": name, "revision": None}


def model_source(model: nn.Module) -> str:
    """``name_or_path`` of a model loaded by :func:`mpsearch.load_vlm`, with ``@revision`` if one was asked.

    Example:
        >>> from mpsearch.models import load_vlm
        >>> model_source(load_vlm("tiny:llava")[0])
        'tiny:llava'
    """
    info = model_info(model)
    return f"{info['model']}@{info['revision']}" if info.get("revision") else str(info["model"])


def model_label(model: nn.Module) -> str:
    """The model's name for artifacts: :func:`model_source` when a loader recorded it, else the
    config's ``name_or_path``, else the class name. Never raises.

    Example:
        >>> model_label(nn.Linear(2, 2))
        'Linear'
    """
    try:
        return model_source(model)
    except MpsError:  # not loaded by load_vlm and no name_or_path
        return type(model).__name__
