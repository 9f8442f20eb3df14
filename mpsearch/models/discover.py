"""Discovering a VLM's linear layers: :func:`discover_layers` and the registration hook.

Every ``nn.Linear`` of a model (plus any module class registered with
:func:`register_quantized_module`, so a model with quantized layers swapped in is rediscovered)
becomes a :class:`~mpsearch.models.layer.Layer` placed in one of four groups by the rule of
:mod:`mpsearch.models.groups`, with its shape, natural tie group (q/k/v of one attention block,
gate/up of one MLP), block depth and weight tying. A linear layer no rule covers is never
guessed: :func:`discover_layers` raises :class:`~mpsearch.errors.MpsError` naming it.

Linear layers owned by ``nn.MultiheadAttention`` (its ``out_proj``; e.g. SigLIP's pooling head)
are not listed: that module reads ``out_proj.weight`` directly, so swapping the submodule would
not change what runs (:data:`UNSWAPPABLE_PARENTS`).

Example:
    >>> from mpsearch.models import load_vlm, discover_layers, group_summary
    >>> model, processor = load_vlm("tiny:llava")
    >>> layers = discover_layers(model)
    >>> layers[-1].name, layers[-1].group
    ('lm_head', 'head')
    >>> sorted(group_summary(layers))
    ['head', 'language', 'projector', 'vision']
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.models.groups import VISION_ANCHORS, depth_of, group_of, root_model_is_language, tie_keys, unplaced_message
from mpsearch.models.layer import Layer

__all__ = ["UNSWAPPABLE_PARENTS", "discover_layers", "linear_types", "register_quantized_module"]

#: Parents whose Linear children cannot be swapped (they read the child's weight directly).
UNSWAPPABLE_PARENTS: tuple[type, ...] = (nn.MultiheadAttention,)

# Module classes besides nn.Linear (and its subclasses) that count as linear layers.
_LINEAR_TYPES: list[type] = []


def register_quantized_module(cls: type) -> type:
    """Make :func:`discover_layers` list modules of class ``cls`` as linear layers.

    For the replacements a format swaps in (they are not ``nn.Linear``): such modules must expose
    ``in_features``, ``out_features`` and ``bias``; their own submodules are not listed. Returns
    ``cls``, so it can decorate a class; registering twice is a no-op.

    Example:
        >>> class PackedLinear(nn.Module):
        ...     def __init__(self, i: int, o: int) -> None:
        ...         super().__init__()
        ...         self.in_features, self.out_features, self.bias = i, o, None
        >>> register_quantized_module(PackedLinear) in linear_types()
        True
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise MpsError(f"register_quantized_module needs an nn.Module subclass, got {cls!r}")
    if cls not in _LINEAR_TYPES:
        _LINEAR_TYPES.append(cls)
    return cls


def linear_types() -> tuple[type, ...]:
    """The module classes :func:`discover_layers` lists: ``nn.Linear`` and the registered ones.

    Example:
        >>> nn.Linear in linear_types()
        True
    """
    return (nn.Linear, *_LINEAR_TYPES)


def _linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, has_bias)`` of a linear-like module (not from the weight
    tensor, which a 4-bit layer stores packed)."""
    bias = getattr(module, "bias", None)
    if callable(bias) and not isinstance(bias, torch.Tensor):  # torch.ao quantized Linear: bias()
        bias = bias()
    return int(module.in_features), int(module.out_features), bias is not None


def _iter_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` for every swappable linear layer, in module order."""
    types = linear_types()
    skip: set[str] = set()
    inside = "\0"  # prefix of the layer last yielded: named_modules() is pre-order, so its
    for name, module in model.named_modules():  # descendants (a swapped wrapper's inner modules) follow it
        if name.startswith(inside):
            continue
        if isinstance(module, UNSWAPPABLE_PARENTS):
            skip.update(f"{name}.{child}" if name else child for child, _ in module.named_children())
        if name and name not in skip and isinstance(module, types):
            inside = name + "."
            yield name, module


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): [owning module paths]}`` over all parameters, duplicates kept."""
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname.rpartition(".")[0])
    return owners


def _no_vision_error(model: nn.Module) -> MpsError:
    return MpsError(
        f"no vision tower found in {type(model).__name__}: is this a vision-language model? "
        f"(looked for linear layers under {', '.join(sorted(VISION_ANCHORS))})"
    )


def discover_layers(model: nn.Module) -> list[Layer]:
    """Every linear layer of a VLM, in module order, placed in vision/projector/language/head.

    Raises :class:`MpsError` if the model has no vision tower, or if some linear layer cannot
    be placed (all such layers are named). The placement rule is :mod:`mpsearch.models.groups`.

    Example:
        >>> from mpsearch.models import load_vlm
        >>> model, _ = load_vlm("tiny:qwen2_vl")
        >>> [l.name for l in discover_layers(model) if l.group == "projector"]
        ['model.visual.merger.mlp.0', 'model.visual.merger.mlp.2']
    """
    if not isinstance(model, nn.Module):
        raise MpsError(f"discover_layers needs a torch nn.Module, got {type(model).__name__}")
    linears = list(_iter_linears(model))
    root_is_language = root_model_is_language(name for name, _ in model.named_modules())
    groups = {name: group_of(name, root_is_language=root_is_language) for name, _ in linears}
    if "vision" not in groups.values():
        raise _no_vision_error(model)
    unplaced: Sequence[str] = [name for name, group in groups.items() if group is None]
    if unplaced:
        raise MpsError(unplaced_message(unplaced, type(model).__name__))
    shapes = {name: _linear_shape(module) for name, module in linears}
    ties = tie_keys(shapes, {name: shape[0] for name, shape in shapes.items()})
    owners = _weight_owners(model)
    layers = []
    for name, module in linears:
        weight = getattr(module, "weight", None)
        others = [o for o in owners.get(id(weight), []) if o != name] if weight is not None else []
        group = str(groups[name])
        layers.append(Layer(name, group, *shapes[name], tie=ties.get(name), depth=depth_of(name, group),
                            weight_tied_to=others[0] if others else None))
    return layers
