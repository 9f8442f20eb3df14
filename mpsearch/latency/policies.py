"""The policies latency work times besides the table's own: the space's uniform policies and
random draws, made the one way there is (:meth:`SearchSpace.uniform_policies`,
:meth:`SearchSpace.sample`), so a policy timed here has the same ``Policy.key()`` as the same
assignment in the search or in evaluation.

Example:
    >>> [p.meta["label"] for p in uniform_policies(space, layers)][:2]   # doctest: +SKIP
    ['uniform fp32', 'uniform torch.int8dyn']
"""
from __future__ import annotations

from typing import Any, Sequence


def random_policies(space: Any, layers: Sequence[Any], k: int, seed: int = 0) -> list[Any]:
    """``k`` policies drawn uniformly per decision of ``space`` (``space.sample``).

    Example:
        >>> [p.meta["label"] for p in random_policies(space, layers, 3, seed=0)]   # doctest: +SKIP
        ['random 0', 'random 1', 'random 2']
    """
    return space.sample(list(layers), int(k), seed=seed)


def uniform_policies(space: Any, layers: Sequence[Any]) -> list[Any]:
    """One policy per format of ``space`` (``space.uniform_policies``).

    Example:
        >>> [p.meta["label"] for p in uniform_policies(space, layers)][:2]   # doctest: +SKIP
        ['uniform fp32', 'uniform torch.int8dyn']
    """
    return space.uniform_policies(list(layers))


__all__ = ["random_policies", "uniform_policies"]
