"""Sensitivity profiling: how much worse the model gets if one layer runs in one format.

Methods: ``hessian`` (HAWQ trace x quantization error), ``fisher`` (empirical Fisher diagonal
x squared perturbation), ``activation`` (layer output error on calibration activations) and
``kl`` (measured KL divergence of next-token distributions with the layer quantized).
See :mod:`mpsearch.sensitivity.profiler` for the formulas and costs.

Example:
    >>> import mpsearch as mps                                                          # doctest: +SKIP
    >>> sens = mps.profile(model, processor, bench, layers, space, method="activation")  # doctest: +SKIP
    >>> sens.to_json("sens.json")                                                       # doctest: +SKIP
"""
from __future__ import annotations

from mpsearch.sensitivity.calib import answer_loss, calibration_batches
from mpsearch.sensitivity.hessian import TraceEstimate, hessian_traces, hutchinson
from mpsearch.sensitivity.kl import kl_to_reference, reference_logits
from mpsearch.sensitivity.profiler import METHODS, profile
from mpsearch.sensitivity.report import SensitivityReport, agreement, spearman

__all__ = [
    "METHODS",
    "SensitivityReport",
    "TraceEstimate",
    "agreement",
    "answer_loss",
    "calibration_batches",
    "hessian_traces",
    "hutchinson",
    "kl_to_reference",
    "profile",
    "reference_logits",
    "spearman",
]
