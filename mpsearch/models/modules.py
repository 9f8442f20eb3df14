"""Reaching a submodule by its dotted path and replacing it: :func:`get_module`, :func:`set_module`.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> get_module(net, "0").out_features
    2
"""
from __future__ import annotations

from torch import nn

from mpsearch.errors import MpsError

__all__ = ["get_module", "set_module"]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted path (numeric parts index ModuleLists); ``""`` is the model.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> get_module(net, "0").out_features
        2
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        parent = name.rpartition(".")[0]
        hint = ""
        try:
            children = [c for c, _ in model.get_submodule(parent).named_children()]
            hint = f"; {parent or type(model).__name__} has {children[:12]}"
        except AttributeError:
            pass
        raise MpsError(f"no module {name!r} in {type(model).__name__}{hint}") from None


def set_module(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Replace the existing submodule at a dotted path; returns the module it replaced.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> old = set_module(net, "0", nn.Identity())
        >>> type(net[0]).__name__, type(old).__name__
        ('Identity', 'Linear')
    """
    if not name:
        raise MpsError("set_module needs a submodule path, got '' (the model itself)")
    if not isinstance(new_module, nn.Module):
        raise MpsError(f"set_module({name!r}): new module must be an nn.Module, got {type(new_module).__name__}")
    old = get_module(model, name)
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, new_module)
    return old
