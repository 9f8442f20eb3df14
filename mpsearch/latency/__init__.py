"""Latency on the target device: workloads, timers, per-layer tables, validation, roofline.

Public names (``mpsearch.Workload``, ``LatencyTable``, ``measure_latency_table``,
``measure_model_latency``) are re-exported here; see the submodules:

* :mod:`mpsearch.latency.workload`: :class:`Workload`, token counts and dummy inputs from the config;
* :mod:`mpsearch.latency.timing`: :class:`Timing`, CUDA-event / ``perf_counter`` timers;
* :mod:`mpsearch.latency.table`: :class:`LatencyTable` (JSON, cache);
* :mod:`mpsearch.latency.measure`: measuring tables and end-to-end timings;
* :mod:`mpsearch.latency.validate`: predicted vs measured, the fitted correction;
* :mod:`mpsearch.latency.roofline`: the memory-bandwidth bound of a decode step.

Example:
    >>> import mpsearch as mps                                                  # doctest: +SKIP
    >>> model, _ = mps.load_vlm("tiny:llava")                                   # doctest: +SKIP
    >>> w = mps.Workload(batch=1, phase="prefill", threads=1)                   # doctest: +SKIP
    >>> lat = mps.measure_latency_table(model, mps.discover_layers(model),
    ...                                 mps.SearchSpace.from_yaml("cpu"), w)    # doctest: +SKIP
"""
from __future__ import annotations

from mpsearch.latency.measure import (
    check_model_matches,
    measure_latency_table,
    measure_model_latency,
    measure_policies,
)
from mpsearch.latency.roofline import bandwidth_bytes_per_s, roofline_ms
from mpsearch.latency.table import LatencyTable
from mpsearch.latency.timing import Timing, time_callable
from mpsearch.latency.validate import (
    Correction,
    ValidationReport,
    fit_correction,
    random_policies,
    uniform_policies,
    validate_table,
)
from mpsearch.latency.workload import TokenCounts, Workload, dummy_inputs, token_counts

__all__ = [
    "Correction",
    "LatencyTable",
    "Timing",
    "TokenCounts",
    "ValidationReport",
    "Workload",
    "bandwidth_bytes_per_s",
    "check_model_matches",
    "dummy_inputs",
    "fit_correction",
    "measure_latency_table",
    "measure_model_latency",
    "measure_policies",
    "random_policies",
    "roofline_ms",
    "time_callable",
    "token_counts",
    "uniform_policies",
    "validate_table",
]
