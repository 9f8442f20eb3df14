"""What the latency code reads off a model: its device name, dtype, label, and current formats.

Example:
    >>> import torch
    >>> dtype_name(torch.nn.Linear(2, 2).to(torch.bfloat16))
    'bfloat16'
"""
from __future__ import annotations

from typing import Any, Sequence

from mpsearch.artifacts import device_name as _device_name
from mpsearch.errors import MpsError
from mpsearch.models.source import model_label  # noqa: F401 - the one model-name helper, re-exported


def current_device_name(model: Any) -> str:
    """Name of the device the model's parameters live on (GPU name, or the CPU model).

    Example:
        >>> current_device_name(torch.nn.Linear(2, 2)).startswith("cpu")   # doctest: +SKIP
        True
    """
    p = next(model.parameters(), None)
    return _device_name(p.device if p is not None else "cpu")


def dtype_name(model: Any) -> str:
    """The dtype of the model's first floating-point parameter, without ``torch.``."""
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return "float32"


def layer_name(layer: Any) -> str:
    """A layer's module path (a :class:`mpsearch.models.Layer` or a plain name)."""
    return str(getattr(layer, "name", layer))


def check_unquantized(model: Any, names: Sequence[str], what: str) -> dict[str, str]:
    """The current (full-precision) format of each named layer; :class:`MpsError` if one is
    already quantized or is not a Linear layer of the model."""
    from mpsearch.formats import DTYPE_FORMATS, current_formats

    cur = current_formats(model)
    plain = set(DTYPE_FORMATS.values())
    done = [(n, cur[n]) for n in names if n in cur and cur[n] not in plain]
    if done:
        raise MpsError(f"{what} needs the full-precision model; layer {done[0][0]!r} is already {done[0][1]}")
    missing = [n for n in names if n not in cur]
    if missing:
        raise MpsError(f"layer {missing[0]!r} is not a Linear layer of this model (see `mpsearch layers MODEL`)")
    return {n: cur[n] for n in names}


__all__ = ["current_device_name", "model_label", "dtype_name", "layer_name", "check_unquantized"]
