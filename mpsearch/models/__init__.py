"""Models at the head of the pipeline: loading a VLM and listing its linear layers.

One job per file:

============== ==============================================================================
``groups.py``  the four group names and the name -> group rule (also depth and tie from names);
               torch-free, shared by discovery, search spaces, reports and plain-dict searches
``layer.py``   :class:`Layer`, the one layer type from discovery to search and export
``discover.py`` :func:`discover_layers` over an ``nn.Module``; :func:`register_quantized_module`
``modules.py`` :func:`get_module` / :func:`set_module` by dotted path
``load.py``    :func:`load_vlm` (``demo``, ``tiny:<arch>``, a directory, a hub id / cache entry)
``tiny.py``    tiny random models of real transformers classes (:data:`TINY_ARCHS`)
``source.py``  where a model came from (:func:`model_info`, :func:`model_source`)
============== ==============================================================================

Names are imported lazily, so ``mpsearch.models.groups`` and ``mpsearch.models.layer`` do not
import torch.

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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpsearch.models.discover import UNSWAPPABLE_PARENTS, discover_layers, linear_types, register_quantized_module
    from mpsearch.models.groups import GROUPS, depth_of, group_of, place_names, tie_keys
    from mpsearch.models.layer import Layer, group_summary, layers_from_names
    from mpsearch.models.load import DEMO_DIR, load_vlm
    from mpsearch.models.modules import get_module, set_module
    from mpsearch.models.params import model_device, model_dtype
    from mpsearch.models.source import model_info, model_source, record_source
    from mpsearch.models.tiny import TINY_ARCHS, build_tiny_vlm

_EXPORTS: dict[str, str] = {
    "GROUPS": "groups",
    "group_of": "groups",
    "place_names": "groups",
    "depth_of": "groups",
    "tie_keys": "groups",
    "Layer": "layer",
    "group_summary": "layer",
    "layers_from_names": "layer",
    "discover_layers": "discover",
    "register_quantized_module": "discover",
    "linear_types": "discover",
    "UNSWAPPABLE_PARENTS": "discover",
    "get_module": "modules",
    "set_module": "modules",
    "model_device": "params",
    "model_dtype": "params",
    "load_vlm": "load",
    "DEMO_DIR": "load",
    "build_tiny_vlm": "tiny",
    "TINY_ARCHS": "tiny",
    "model_info": "source",
    "model_source": "source",
    "record_source": "source",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        if name != "DEMO_DIR":  # read from load.py each time: tests and users may point it elsewhere
            globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
