"""The cache key of a measured table: everything that changes a measurement.

The on-disk cache itself (store, look up, name the tables that do not fit) is
:func:`mpsearch.latency.table.load_cached` / :func:`~mpsearch.latency.table.store_cached`.

Example:
    >>> key = table_cache_key(model, layers, Workload(threads=1), "context", cands)   # doctest: +SKIP
    >>> sorted(key)[:3]                                                                # doctest: +SKIP
    ['arch', 'cuda', 'device']
"""
from __future__ import annotations

from typing import Any, Sequence

from mpsearch.hashing import json_key
from mpsearch.latency.model_info import current_device_name, dtype_name, layer_name, model_label
from mpsearch.latency.table import library_key
from mpsearch.latency.workload import Workload, model_arch


def table_cache_key(model: Any, layers: Sequence[Any], workload: Workload, method: str,
                    candidates: dict[str, list[str]]) -> dict[str, Any]:
    """Everything that changes a measured table: device, dtype, threads, workload, method,
    layer shapes and candidate formats, library versions, model.

    Example:
        >>> table_cache_key(model, layers, Workload(), "context", cands)["threads"]   # doctest: +SKIP
        2
    """
    import torch

    from mpsearch.formats import current_formats

    cur = current_formats(model)
    layer_sig = [[layer_name(x), cur.get(layer_name(x)), candidates[layer_name(x)]] for x in layers]
    p = next(model.parameters())
    return {
        "model": model_label(model),
        "arch": model_arch(model),
        "device": current_device_name(model),
        "dtype": dtype_name(model),
        "threads": workload.threads or torch.get_num_threads(),
        "workload": workload.timing_key(),
        "method": method,
        "layers": json_key(layer_sig),
        "shapes": shape_signature(model, layers),
        "formats": sorted({f for c in candidates.values() for f in c}),
        "versions": library_key(),
        "cuda": torch.version.cuda if p.device.type == "cuda" else None,
    }


def shape_signature(model: Any, layers: Sequence[Any]) -> str:
    """Short hash of every layer's ``(in, out, bias)``."""
    from mpsearch.models import get_module

    shapes = []
    for x in layers:
        m = get_module(model, layer_name(x))
        shapes.append([m.in_features, m.out_features, getattr(m, "bias", None) is not None])
    return json_key(shapes)


__all__ = ["table_cache_key", "shape_signature"]
