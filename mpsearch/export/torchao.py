"""A policy as a torchao ``FqnToConfig`` (the Python object and its JSON form).

torchao quantizes a model with ``quantize_(model, config)``; ``FqnToConfig`` maps module
paths to per-module configs (``None`` = leave the module alone), and transformers takes it
as ``TorchAoConfig(quant_type=...)``. The JSON form is torchao's own serialization
(``torchao.core.config.config_to_dict``: ``{"_type", "_version", "_data"}``); the Python object
is built from it with torchao's ``config_from_dict``, so both always agree.

torchao re-quantizes from the full-precision weights: this is a recipe, not a checkpoint. Its
rounding matches mpsearch's exactly only for the ``ao.*`` formats (the very configs mpsearch
applies). Mapping (torchao >= 0.14 names; checked against torchao 0.18's source, not run here):

| mpsearch format | torchao config |
|---|---|
| ``ao.int8wo`` | ``Int8WeightOnlyConfig()`` (identical) |
| ``ao.int4wo`` | ``Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")`` (identical) |
| ``ao.fp8`` | ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` (identical) |
| ``rtn.int8ch``, ``torch.int8wo`` | ``Int8WeightOnlyConfig()`` (same scheme: int8 symmetric per row) |
| ``rtn.int4g128`` | ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128), mapping_type=SYMMETRIC)`` |
| ``torch.int8dyn`` | ``Int8DynamicActivationInt8WeightConfig()`` (same weights; per-token activations) |
| ``torch.int4wo`` | ``Int4WeightOnlyConfig(group_size=64, int4_packing_format="opaque")`` (torchao's CPU int4 kernel) |
| ``fp32``/``bf16``/``fp16`` | ``None`` (not quantized; the dtype is the one the model is loaded in) |

``bnb.*`` and ``rtn.int4/int3/int2`` have no torchao config and are refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from mpsearch.errors import MpsError

INSTALL = "pip install 'mpsearch[ao]'"


def _per_row() -> dict[str, Any]:
    return {"_type": "PerRow", "_version": 1, "_data": {}}


#: format -> torchao config in torchao's JSON form (only the fields mpsearch sets; torchao fills
#: the rest with its defaults when it reads the dict)
TORCHAO_CONFIGS: dict[str, dict[str, Any] | None] = {
    "ao.int8wo": {"_type": "Int8WeightOnlyConfig", "_version": 1, "_data": {}},
    "ao.int4wo": {"_type": "Int4WeightOnlyConfig", "_version": 1,
                  "_data": {"group_size": 128, "int4_packing_format": "tile_packed_to_4d"}},
    "ao.fp8": {"_type": "Float8DynamicActivationFloat8WeightConfig", "_version": 1, "_data": {"granularity": _per_row()}},
    "rtn.int8ch": {"_type": "Int8WeightOnlyConfig", "_version": 1, "_data": {}},
    "torch.int8wo": {"_type": "Int8WeightOnlyConfig", "_version": 1, "_data": {}},
    "rtn.int4g128": {"_type": "IntxWeightOnlyConfig", "_version": 1, "_data": {
        "weight_dtype": {"_type": "torch.dtype", "_data": "int4"},
        "granularity": {"_type": "PerGroup", "_version": 1, "_data": {"group_size": 128}},
        "mapping_type": {"_type": "MappingType", "_data": "SYMMETRIC"}}},
    "torch.int8dyn": {"_type": "Int8DynamicActivationInt8WeightConfig", "_version": 1, "_data": {}},
    "torch.int4wo": {"_type": "Int4WeightOnlyConfig", "_version": 1,
                     "_data": {"group_size": 64, "int4_packing_format": "opaque"}},
    "fp32": None,
    "bf16": None,
    "fp16": None,
}


def exportable_formats_torchao() -> list[str]:
    """Registered formats with a torchao config, in registry order."""
    from mpsearch.formats import FORMATS

    return [n for n in FORMATS if n in TORCHAO_CONFIGS]


def _layer_names(model_or_layers: nn.Module | Iterable[Any]) -> tuple[list[Any], nn.Module | None]:
    if isinstance(model_or_layers, nn.Module):
        from mpsearch.models import discover_layers

        return discover_layers(model_or_layers), model_or_layers
    return list(model_or_layers), None


def torchao_config_dict(model_or_layers: nn.Module | Iterable[Any], policy: Any, space: Any = None) -> dict[str, Any]:
    """The policy as torchao's JSON form of an ``FqnToConfig`` (a plain dict; torchao not needed).

    ``model_or_layers`` is the model or its :func:`mpsearch.discover_layers` list. Every layer is
    listed by its exact module path; a format without a torchao config raises naming the layer.

    Example:
        >>> import mpsearch as mps
        >>> model, _ = mps.load_vlm("tiny:llava")
        >>> d = torchao_config_dict(model, mps.Policy({"lm_head": "ao.int8wo"}, default="fp32"))
        >>> d["_type"], d["_data"]["fqn_to_config"]["lm_head"]["_type"]
        ('FqnToConfig', 'Int8WeightOnlyConfig')
    """
    from mpsearch.export.compressed_tensors import _check_ties

    layers, _ = _layer_names(model_or_layers)
    names = [getattr(l, "name", l) for l in layers]
    resolved = policy.resolve(names)
    ok = exportable_formats_torchao()
    for name in names:
        fmt = resolved.formats[name]
        if fmt not in ok:
            raise MpsError(f"layer {name!r} has format {fmt!r}, which has no torchao config; "
                           f"formats torchao takes: {', '.join(ok)}")
    if all(hasattr(l, "tie") for l in layers):
        _check_ties(layers, resolved.formats, space, key=lambda f: json.dumps(TORCHAO_CONFIGS[f], sort_keys=True))
    table = {name: TORCHAO_CONFIGS[resolved.formats[name]] for name in names}
    return {"_type": "FqnToConfig", "_version": 1, "_data": {"fqn_to_config": table}}


def torchao_config(model_or_layers: nn.Module | Iterable[Any], policy: Any, space: Any = None) -> Any:
    """The policy as a torchao ``FqnToConfig`` object (needs torchao; built from :func:`torchao_config_dict`).

    Example:
        >>> cfg = torchao_config(model, policy)                    # doctest: +SKIP
        >>> from torchao.quantization import quantize_             # doctest: +SKIP
        >>> quantize_(model, cfg, filter_fn=None)                  # doctest: +SKIP
    """
    try:
        from torchao.core.config import config_from_dict
    except ImportError as exc:
        raise MpsError(f"torchao_config needs torchao: {INSTALL} ({exc}); torchao_config_dict gives the JSON form "
                       f"without it") from None
    return config_from_dict(torchao_config_dict(model_or_layers, policy, space))


def write_torchao_config(model_or_layers: nn.Module | Iterable[Any], policy: Any, path: str | Path,
                         space: Any = None) -> Path:
    """Write :func:`torchao_config_dict` as JSON (atomically); returns the path."""
    from mpsearch.artifacts import atomic_write_text

    data = torchao_config_dict(model_or_layers, policy, space)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return Path(path)
