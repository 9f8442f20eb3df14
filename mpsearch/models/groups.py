"""The four layer groups and what a linear layer's module path says: its group, depth and tie.

This is the one place for the group names (``vision``, ``projector``, ``language``, ``head``)
and for the placement rule. It reads names only (no torch), so a sensitivity report or a
latency table built from plain dicts is placed by the same rule
:func:`mpsearch.discover_layers` applies to a model.

The rule: every module path is read component by component; components named like a model
part are *anchors*:

========== =====================================================================
group      anchor names (a module path component)
========== =====================================================================
vision     ``vision_tower``, ``vision_model``, ``visual``, ``vit``, ``vision_encoder``
projector  ``multi_modal_projector``, ``mlp1``, ``connector``, ``merger``,
           ``vision_proj``, ``mm_projector``
language   ``language_model``, ``text_model``, ``llm``; and the root's own ``model``
           child when the model has none of those (InternLM-XComposer2, original LLaVA)
head       the layer's own name is ``lm_head``, or ``output`` (InternLM2) outside any
           numbered block and outside the vision tower / projector
========== =====================================================================

The deepest anchor on the path wins, so Qwen2-VL's ``model.visual.merger`` is the projector
although it sits under ``visual``. A name no anchor covers is never guessed.

Example:
    >>> place_names(["model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0", "lm_head"])
    {'model.visual.blocks.0.attn.qkv': 'vision', 'model.visual.merger.mlp.0': 'projector', 'lm_head': 'head'}
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

from mpsearch.errors import MpsError

__all__ = [
    "GROUPS",
    "VISION_ANCHORS",
    "PROJECTOR_ANCHORS",
    "LANGUAGE_ANCHORS",
    "HEAD_NAMES",
    "group_of",
    "root_model_is_language",
    "place_names",
    "depth_of",
    "tie_keys",
    "unplaced_message",
]

#: The layer groups, in pipeline order.
GROUPS: tuple[str, ...] = ("vision", "projector", "language", "head")

VISION_ANCHORS = frozenset({"vision_tower", "vision_model", "visual", "vit", "vision_encoder"})
PROJECTOR_ANCHORS = frozenset({"multi_modal_projector", "mlp1", "connector", "merger", "vision_proj", "mm_projector"})
LANGUAGE_ANCHORS = frozenset({"language_model", "text_model", "llm"})
HEAD_NAMES = frozenset({"lm_head", "output"})

_TIE_PATTERNS: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset({"q_proj", "k_proj", "v_proj"}), "qkv"),
    (frozenset({"query", "key", "value"}), "qkv"),
    (frozenset({"gate_proj", "up_proj"}), "gate_up"),
    (frozenset({"w1", "w3"}), "gate_up"),  # InternLM2: w2(act(w1 x) * w3 x)
)
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|layer|blocks)\.(\d+)(?:\.|$)")


def _anchor_group(component: str, index: int, root_is_language: bool) -> str | None:
    if component in VISION_ANCHORS:
        return "vision"
    if component in PROJECTOR_ANCHORS:
        return "projector"
    if component in LANGUAGE_ANCHORS or (index == 0 and component == "model" and root_is_language):
        return "language"
    return None


def root_model_is_language(module_paths: Iterable[str]) -> bool:
    """True when no path component is a language anchor: the root's ``model`` child is then the
    language model (InternLM-XComposer2, original LLaVA).

    Example:
        >>> root_model_is_language(["model.layers.0.mlp.w1", "vit.blocks.0.fc1"])
        True
    """
    return not any(part in LANGUAGE_ANCHORS for path in module_paths for part in path.split("."))


def group_of(name: str, *, root_is_language: bool) -> str | None:
    """The group of the linear layer at module path ``name``, or None if no rule covers it.

    ``root_is_language``: see :func:`root_model_is_language`.

    Example:
        >>> group_of("model.visual.merger.mlp.0", root_is_language=False)
        'projector'
    """
    parts = name.split(".")
    group = None
    for i, part in enumerate(parts[:-1]):
        group = _anchor_group(part, i, root_is_language) or group
    last = parts[-1]
    if last == "lm_head":
        return "head"
    if last == "output" and group in (None, "language") and not _BLOCK_RE.search(name):
        return "head"
    return _anchor_group(last, len(parts) - 1, root_is_language) or group


def unplaced_message(names: Sequence[str], owner: str) -> str:
    """The one-line explanation for layers no rule places (``owner``: what they belong to)."""
    shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    return (
        f"cannot place {len(names)} linear layer(s) of {owner} into "
        f"vision/projector/language/head: {shown}; known parts are vision "
        f"{sorted(VISION_ANCHORS)}, projector {sorted(PROJECTOR_ANCHORS)}, language "
        f"{sorted(LANGUAGE_ANCHORS)}, head {sorted(HEAD_NAMES)}"
    )


def place_names(names: Iterable[str], *, owner: str = "these layers", how: str = "") -> dict[str, str]:
    """``{name: group}`` for layer names alone, by the rule :func:`mpsearch.discover_layers` applies.

    Whether the root ``model`` is the language model is read from the names themselves. Raises
    :class:`MpsError` naming every name no rule places; ``how`` is appended to say how the
    caller can give groups instead.

    Example:
        >>> place_names(["model.layers.0.attention.wqkv", "vit.vision_tower.blocks.0.fc1", "output"])
        {'model.layers.0.attention.wqkv': 'language', 'vit.vision_tower.blocks.0.fc1': 'vision', 'output': 'head'}
    """
    names = [str(n) for n in names]
    root_is_language = root_model_is_language(names)
    groups = {n: group_of(n, root_is_language=root_is_language) for n in names}
    unplaced = [n for n, g in groups.items() if g is None]
    if unplaced:
        raise MpsError(unplaced_message(unplaced, owner) + (f"; {how}" if how else ""))
    return {n: g for n, g in groups.items() if g is not None}


def depth_of(name: str, group: str) -> int | None:
    """The block index of a layer (``layers.N`` / ``layer.N`` / ``blocks.N``); None for the
    projector, the head and unnumbered layers.

    Example:
        >>> depth_of("model.language_model.layers.3.mlp.down_proj", "language")
        3
    """
    if group in ("projector", "head"):
        return None
    match = _BLOCK_RE.search(name)
    return int(match.group(1)) if match else None


def tie_keys(names: Iterable[str], in_features: Mapping[str, int] | None = None) -> dict[str, str]:
    """``{layer name: tie key}`` for the q/k/v and gate/up sets that share a parent.

    A set needs 2+ members present and, when ``in_features`` is given, one input size
    (``"<parent>.qkv"``, ``"<parent>.gate_up"``). A fused ``qkv`` layer is one layer: no tie.

    Example:
        >>> tie_keys(["blk.0.q_proj", "blk.0.k_proj", "blk.0.o_proj"])
        {'blk.0.k_proj': 'blk.0.qkv', 'blk.0.q_proj': 'blk.0.qkv'}
    """
    by_parent: dict[str, dict[str, str]] = {}
    for name in names:
        parent, _, last = name.rpartition(".")
        by_parent.setdefault(parent, {})[last] = name
    keys: dict[str, str] = {}
    for parent, children in by_parent.items():
        for members, suffix in _TIE_PATTERNS:
            present = [children[m] for m in sorted(members) if m in children]
            if len(present) < 2:
                continue
            if in_features is not None and len({in_features[n] for n in present}) != 1:
                continue
            keys.update({n: f"{parent}.{suffix}" if parent else suffix for n in present})
    return keys
