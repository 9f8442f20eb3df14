"""What a model's parameters say about it: its device and its floating dtype.

The one copy for every stage (sensitivity, evaluation, export).

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 2).to(torch.bfloat16)
    >>> model_dtype(net), model_device(net).type
    (torch.bfloat16, 'cpu')
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["model_device", "model_dtype"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The model's floating dtype (``model.dtype``, else its first floating parameter's;
    float32 for a model without one)."""
    dt = getattr(model, "dtype", None)
    if isinstance(dt, torch.dtype) and dt.is_floating_point:
        return dt
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
