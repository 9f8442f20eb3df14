"""Synthetic search instances shaped like a small VLM, for tests and benchmarks.

A vision tower (q/k/v tied, out, fc1, fc2 per block), a 2-layer projector, a language model
(q/k/v tied, o, gate/up tied, down per block) and a head; real format names; scores that grow
as precision drops and vary per layer (log-normal, deeper language layers more sensitive);
per-layer latencies proportional to the layer's parameters with per-format speed factors and
noise; exact bytes from the format registry. Everything is drawn from ``seed``.

Example:
    >>> inst = synthetic_instance(n_blocks=2, vision_blocks=1, seed=0)
    >>> len(inst.layers), inst.space.name
    (23, 'synthetic')
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mpsearch.models import Layer

#: (format, relative latency, relative error) of the default 4-format instance (GPU-like).
DEFAULT_FORMATS: tuple[tuple[str, float, float], ...] = (
    ("bf16", 1.00, 0.0),
    ("ao.int8wo", 0.62, 1.0),
    ("ao.fp8", 0.55, 2.5),
    ("ao.int4wo", 0.45, 12.0),
)


@dataclass
class SyntheticInstance:
    """Layers, a search space, a sensitivity report and a latency table."""

    layers: list[Layer]
    space: object
    sens: object
    lat: object


def synthetic_instance(
    n_blocks: int = 24,
    vision_blocks: int = 12,
    hidden: int = 2048,
    vision_hidden: int = 1024,
    formats: Sequence[tuple[str, float, float]] = DEFAULT_FORMATS,
    seed: int = 0,
    tie: bool = True,
    pin_head: bool = True,
) -> SyntheticInstance:
    """A VLM-shaped instance; decisions = 4 per language block + 4 per vision block + 2 (+ head).

    Example:
        >>> inst = synthetic_instance(n_blocks=1, vision_blocks=1, seed=1)
        >>> len(inst.space.decisions(inst.layers))
        11
    """
    from mpsearch.latency import LatencyTable
    from mpsearch.sensitivity.report import SensitivityReport
    from mpsearch.space import SearchSpace

    rng = np.random.default_rng(seed)
    layers: list[Layer] = []
    for b in range(vision_blocks):
        p = f"vision.layers.{b}"
        for leaf, i, o in (("q_proj", vision_hidden, vision_hidden), ("k_proj", vision_hidden, vision_hidden),
                           ("v_proj", vision_hidden, vision_hidden), ("out_proj", vision_hidden, vision_hidden),
                           ("fc1", vision_hidden, 4 * vision_hidden), ("fc2", 4 * vision_hidden, vision_hidden)):
            layers.append(Layer(f"{p}.{leaf}", "vision", i, o, True, depth=b))
    layers.append(Layer("projector.linear_1", "projector", vision_hidden, hidden, True))
    layers.append(Layer("projector.linear_2", "projector", hidden, hidden, True))
    for b in range(n_blocks):
        p = f"language.layers.{b}"
        for leaf, i, o in (("self_attn.q_proj", hidden, hidden), ("self_attn.k_proj", hidden, hidden // 4),
                           ("self_attn.v_proj", hidden, hidden // 4), ("self_attn.o_proj", hidden, hidden),
                           ("mlp.gate_proj", hidden, 3 * hidden), ("mlp.up_proj", hidden, 3 * hidden),
                           ("mlp.down_proj", 3 * hidden, hidden)):
            layers.append(Layer(f"{p}.{leaf}", "language", i, o, False, depth=b))
    layers.append(Layer("lm_head", "head", hidden, 32000, False))

    names = [f for f, _, _ in formats]
    speed = {f: s for f, s, _ in formats}
    err = {f: e for f, _, e in formats}
    scores: dict[str, dict[str, float]] = {}
    ms: dict[str, dict[str, float]] = {}
    for layer in layers:
        depth_w = 1.0 + (2.0 * (layer.depth or 0) / max(1, n_blocks) if layer.group == "language" else 0.0)
        s = float(rng.lognormal(mean=-4.0, sigma=1.0)) * depth_w
        if layer.group == "head":
            s *= 20.0
        base = layer.params / 4e6 * 0.05  # ms per layer in the reference format
        scores[layer.name] = {f: (0.0 if err[f] == 0 else s * err[f] * float(rng.lognormal(0.0, 0.3))) for f in names}
        ms[layer.name] = {f: base * speed[f] * float(rng.lognormal(0.0, 0.08)) for f in names}
    space = SearchSpace(
        name="synthetic",
        groups={"vision": names, "projector": names[:2], "language": names, "head": names[:2]},
        pin={"lm_head": names[0]} if pin_head else {},
        tie=[["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] if tie else [],
    )
    sens = SensitivityReport(scores, method="synthetic",
                             meta={"groups": {l.name: l.group for l in layers}, "model": f"synthetic-{seed}"})
    base_ms = 0.1 * sum(row[names[0]] for row in ms.values())  # the rest of the model: 10% of it
    lat = LatencyTable(base_ms=base_ms, ms=ms, meta={"device": "synthetic"})
    return SyntheticInstance(layers, space, sens, lat)
