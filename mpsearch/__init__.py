"""mpsearch: mixed-precision quantization policy search for vision-language models.

Example:
    >>> import mpsearch as mps
    >>> model, processor = mps.load_vlm("demo")                     # doctest: +SKIP
    >>> layers = mps.discover_layers(model)                         # doctest: +SKIP

Public names are imported lazily (``import mpsearch`` stays fast and does not import torch).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # models
    "load_vlm": "mpsearch.models",
    "discover_layers": "mpsearch.models",
    "Layer": "mpsearch.models",
    # formats and policies
    "apply_policy": "mpsearch.formats",
    "AppliedReport": "mpsearch.formats",
    "policy_memory_bytes": "mpsearch.formats",
    "ModuleBank": "mpsearch.formats",
    "FORMATS": "mpsearch.formats",
    "get_format": "mpsearch.formats",
    "Policy": "mpsearch.policy",
    "SearchSpace": "mpsearch.space",
    # stages
    "load_benchmark": "mpsearch.tasks",
    "profile": "mpsearch.sensitivity",
    "SensitivityReport": "mpsearch.sensitivity",
    "Workload": "mpsearch.latency",
    "LatencyTable": "mpsearch.latency",
    "measure_latency_table": "mpsearch.latency",
    "measure_model_latency": "mpsearch.latency",
    "search": "mpsearch.searching",
    "solve_ilp": "mpsearch.searching",
    "refine": "mpsearch.searching",
    "Candidate": "mpsearch.searching",
    "evaluate": "mpsearch.evaluation",
    "Result": "mpsearch.evaluation",
    "load_quantized": "mpsearch.pipeline",
    "export_checkpoint": "mpsearch.export",
    "exportable_formats": "mpsearch.export",
    "MpsError": "mpsearch.errors",
}
_SUBMODULES = {"mmmu": "mpsearch.tasks.mmmu", "sensitivity": "mpsearch.sensitivity", "plots": "mpsearch.plots"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(_SUBMODULES[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'mpsearch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
