"""The policies latency work times besides the table's own: uniform ones and random draws of a space.

Example:
    >>> [p.meta["label"] for p in uniform_policies(space, layers)][:2]   # doctest: +SKIP
    ['uniform fp32', 'uniform torch.int8dyn']
"""
from __future__ import annotations

import random
from typing import Any, Sequence

from mpsearch.latency.model_info import layer_name


def random_policies(space: Any, layers: Sequence[Any], k: int, seed: int = 0) -> list[Any]:
    """``k`` policies drawn uniformly per decision of ``space`` (ties and pins respected).

    Example:
        >>> pols = random_policies(space, layers, 3, seed=0)          # doctest: +SKIP
        >>> [p.meta["label"] for p in pols]                          # doctest: +SKIP
        ['random 0', 'random 1', 'random 2']
    """
    from mpsearch.policy import Policy

    rng = random.Random(seed)
    decisions = space.decisions(list(layers))
    out = []
    for i in range(k):
        mapping: dict[str, str] = {}
        for d in decisions:
            fmt = d.choices[0] if len(d.choices) == 1 else rng.choice(list(d.choices))
            for n in d.layers:
                mapping[n] = fmt
        default = next(iter(mapping.values())) if mapping else "fp32"
        out.append(Policy(mapping, default=default, meta={"label": f"random {i}"}))
    return out


def uniform_policies(space: Any, layers: Sequence[Any]) -> list[Any]:
    """One policy per format of ``space``: that format wherever a layer may take it, else the
    layer's first candidate. Identical policies are listed once.

    Example:
        >>> [p.meta["label"] for p in uniform_policies(space, layers)][:2]   # doctest: +SKIP
        ['uniform fp32', 'uniform torch.int8dyn']
    """
    from mpsearch.policy import Policy

    cands = {layer_name(x): list(space.candidates(x)) for x in layers}
    out, seen = [], set()
    for fmt in space.formats():
        mapping = {n: (fmt if fmt in c else c[0]) for n, c in cands.items()}
        sig = tuple(sorted(mapping.items()))
        if sig in seen or fmt not in {f for c in cands.values() for f in c}:
            continue
        seen.add(sig)
        out.append(Policy(mapping, default=fmt, meta={"label": f"uniform {fmt}"}))
    return out


__all__ = ["random_policies", "uniform_policies"]
