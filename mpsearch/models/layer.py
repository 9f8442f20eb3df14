"""The one layer type, from discovery to search and export: :class:`Layer` (no torch needed).

Example:
    >>> from mpsearch.models import Layer, group_summary
    >>> group_summary([Layer("blocks.0.fc1", "vision", 4, 8, True)])["vision"]
    {'count': 1, 'params': 40}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from mpsearch.errors import MpsError
from mpsearch.models.groups import GROUPS

__all__ = ["Layer", "group_summary", "layers_from_names"]


@dataclass(frozen=True)
class Layer:
    """One linear layer of a model.

    Attributes:
        name: module path, e.g. ``"model.language_model.layers.0.self_attn.q_proj"``.
        group: ``"vision"``, ``"projector"``, ``"language"`` or ``"head"``.
        in_features, out_features: the layer's shape.
        bias: whether the layer has a bias.
        tie: natural tie group key (``"<parent>.qkv"`` for q/k/v of one attention block,
            ``"<parent>.gate_up"`` for gate/up, InternLM2's w1/w3, of one MLP) or ``None``.
            A fused ``qkv``/``wqkv`` layer is already one layer: its tie is ``None``.
        depth: the block index inside its group (from ``layers.N`` / ``layer.N`` /
            ``blocks.N`` in the path); ``None`` for the projector, the head, unnumbered layers.
        weight_tied_to: module path of another module whose parameter *is* this weight
            (e.g. a head tied to the input embeddings), else ``None``. Replacing such a layer
            unties it: the other module keeps the original tensor.

    Example:
        >>> Layer("blocks.0.fc1", "vision", 4, 8, True).params
        40
    """

    name: str
    group: str
    in_features: int
    out_features: int
    bias: bool
    tie: str | None = None
    depth: int | None = None
    weight_tied_to: str | None = None

    @property
    def params(self) -> int:
        """Weight plus bias element count."""
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


def group_summary(layers: Iterable[Layer]) -> dict[str, dict[str, int]]:
    """Layer count and parameter count per group, all four groups in pipeline order.

    Example:
        >>> group_summary([Layer("a", "vision", 2, 3, False)])["vision"]
        {'count': 1, 'params': 6}
    """
    out = {g: {"count": 0, "params": 0} for g in GROUPS}
    for layer in layers:
        if layer.group not in out:
            raise MpsError(f"layer {layer.name}: group {layer.group!r} is not one of {list(GROUPS)}")
        out[layer.group]["count"] += 1
        out[layer.group]["params"] += layer.params
    return out


def layers_from_names(names: Iterable[str], *, owner: str = "these layers", how: str = "") -> list[Layer]:
    """:class:`Layer` s for bare module paths (a report or table built from plain dicts).

    Groups, depths and q/k/v, gate/up ties come from the names by the rule
    :func:`mpsearch.discover_layers` applies (:mod:`mpsearch.models.groups`); shapes are unknown
    (0), so such layers serve latency budgets, not memory ones. A name no rule places raises
    :class:`MpsError` naming it, with ``how`` appended (how the caller can give groups).

    Example:
        >>> [(l.group, l.tie) for l in layers_from_names(["vit.blocks.0.fc1", "llm.layers.0.q_proj",
        ...                                                 "llm.layers.0.k_proj", "lm_head"])]
        [('vision', None), ('language', 'llm.layers.0.qkv'), ('language', 'llm.layers.0.qkv'), ('head', None)]
    """
    from mpsearch.models.groups import depth_of, place_names, tie_keys

    groups = place_names(names, owner=owner, how=how)
    ties = tie_keys(groups)
    return [Layer(n, g, 0, 0, False, tie=ties.get(n), depth=depth_of(n, g)) for n, g in groups.items()]
