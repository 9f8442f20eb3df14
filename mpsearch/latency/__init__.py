"""Latency on the target device: workloads, timers, per-layer tables, validation, roofline.

Public names (``mpsearch.Workload``, ``LatencyTable``, ``measure_latency_table``,
``measure_model_latency``) are re-exported here. One job per file, imports flowing down this list:

* :mod:`~mpsearch.latency.workload`: :class:`Workload`, token counts and dummy inputs from the config;
* :mod:`~mpsearch.latency.timing`: :class:`Timing`, CUDA-event / ``perf_counter`` timers, thread counts;
* :mod:`~mpsearch.latency.table`: :class:`LatencyTable` (JSON, on-disk cache);
* :mod:`~mpsearch.latency.model_info`: device name, dtype, label and formats read off a model;
* :mod:`~mpsearch.latency.policies`: uniform and random policies of a space;
* :mod:`~mpsearch.latency.runner`: :class:`PhaseRunner`, one prefill or decode call;
* :mod:`~mpsearch.latency.compiled`: ``torch.compile`` once per layer configuration, counted, strict;
* :mod:`~mpsearch.latency.end_to_end`: :func:`measure_model_latency`, :func:`measure_policies`;
* :mod:`~mpsearch.latency.hooks`: forward hooks timing Linear calls in context, counting rows;
* :mod:`~mpsearch.latency.result`: what a method returns per phase, the unique key;
* :mod:`~mpsearch.latency.context` / :mod:`~mpsearch.latency.isolated`: the two table methods;
* :mod:`~mpsearch.latency.cache`: the table's cache key;
* :mod:`~mpsearch.latency.threads`: the configured thread count against one thread;
* :mod:`~mpsearch.latency.measure`: :func:`measure_latency_table` (method, cache, phases, meta);
* :mod:`~mpsearch.latency.validate`: predicted vs measured, the fitted correction;
* :mod:`~mpsearch.latency.roofline`: the memory-bandwidth bound of a decode step.

Example:
    >>> import mpsearch as mps                                                  # doctest: +SKIP
    >>> model, _ = mps.load_vlm("tiny:llava")                                   # doctest: +SKIP
    >>> w = mps.Workload(batch=1, phase="prefill", threads=1)                   # doctest: +SKIP
    >>> lat = mps.measure_latency_table(model, mps.discover_layers(model),
    ...                                 mps.SearchSpace.from_yaml("cpu"), w)    # doctest: +SKIP
"""
from __future__ import annotations

from mpsearch.latency.compiled import compile_stats
from mpsearch.latency.end_to_end import check_model_matches, measure_model_latency, measure_policies
from mpsearch.latency.measure import measure_latency_table
from mpsearch.latency.model_info import current_device_name
from mpsearch.latency.policies import random_policies, uniform_policies
from mpsearch.latency.roofline import bandwidth_bytes_per_s, roofline_ms
from mpsearch.latency.runner import PhaseRunner
from mpsearch.latency.table import LatencyTable
from mpsearch.latency.threads import check_threads
from mpsearch.latency.timing import Timing, time_callable
from mpsearch.latency.validate import Correction, ValidationReport, fit_correction, validate_table
from mpsearch.latency.workload import TokenCounts, Workload, dummy_inputs, token_counts

__all__ = [
    "Correction",
    "LatencyTable",
    "PhaseRunner",
    "Timing",
    "TokenCounts",
    "ValidationReport",
    "Workload",
    "bandwidth_bytes_per_s",
    "check_model_matches",
    "check_threads",
    "compile_stats",
    "current_device_name",
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
