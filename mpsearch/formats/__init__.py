"""The format registry and applying policies (DESIGN.md, "Formats").

A format is a named way to run one ``nn.Linear``: ``fp32``, ``bf16``, ``fp16`` (casts),
``bnb.int8``, ``bnb.nf4``, ``bnb.fp4`` (bitsandbytes), ``torch.int8dyn`` (PyTorch dynamic
int8, CPU), ``torch.int8wo``, ``torch.int4wo`` (PyTorch's CPU weight-only kernels),
``rtn.int4``, ``rtn.int3``, ``rtn.int2`` (mpsearch's group-wise round-to-nearest)
and ``ao.int8wo``, ``ao.int4wo``, ``ao.fp8`` (torchao, optional extra). A new backend
subclasses :class:`Format` in its own module and calls :func:`register_format`.

Example:
    >>> import torch
    >>> from mpsearch.formats import apply_policy, get_format, policy_memory_bytes
    >>> from mpsearch.policy import Policy
    >>> model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    >>> policy = Policy({"0": "bnb.nf4"}, default="fp32")
    >>> expected = policy_memory_bytes(model, policy)
    >>> report = apply_policy(model, policy)
    >>> report.changes[0].new_format, expected == report.bytes_after
    ('bnb.nf4', True)

Bits never predict latency: bitsandbytes formats can be slower than fp32 on CPUs while
``torch.int8dyn`` is faster. Latency is measured by :mod:`mpsearch.latency`.
"""
from __future__ import annotations

from mpsearch.formats.base import (
    DTYPE_FORMATS,
    FORMATS,
    Format,
    QuantizedLinear,
    available_formats,
    device_type,
    dtype_format,
    get_format,
    module_bytes,
    register_format,
    register_hidden_tensors,
)
from mpsearch.formats.cast import CastFormat
from mpsearch.formats.bnb import Bnb4bitFormat, BnbInt8Format
from mpsearch.formats.torch_dyn import TorchDynamicInt8Format
from mpsearch.formats.rtn import RTNFormat, RTNLinear
from mpsearch.formats.ao import AoFormat
from mpsearch.formats.rtn_sym import SymRTNFormat, SymRTNLinear
from mpsearch.formats.torch_wo import Int4WeightOnlyLinear, Int8WeightOnlyLinear, TorchWeightOnlyFormat
from mpsearch.formats.apply import (
    AppliedReport,
    Change,
    MemoryModel,
    ModuleBank,
    apply_policy,
    current_formats,
    policy_memory_bytes,
)


def _register_with_models() -> None:
    """Let :func:`mpsearch.models.discover_layers` list swapped layers as linear layers."""
    from mpsearch.models import register_quantized_module

    register_quantized_module(QuantizedLinear)


_register_with_models()

__all__ = [
    "AppliedReport",
    "AoFormat",
    "Bnb4bitFormat",
    "BnbInt8Format",
    "CastFormat",
    "Change",
    "DTYPE_FORMATS",
    "FORMATS",
    "Format",
    "Int4WeightOnlyLinear",
    "Int8WeightOnlyLinear",
    "MemoryModel",
    "ModuleBank",
    "QuantizedLinear",
    "RTNFormat",
    "RTNLinear",
    "SymRTNFormat",
    "SymRTNLinear",
    "TorchDynamicInt8Format",
    "TorchWeightOnlyFormat",
    "apply_policy",
    "available_formats",
    "current_formats",
    "device_type",
    "dtype_format",
    "get_format",
    "module_bytes",
    "policy_memory_bytes",
    "register_format",
    "register_hidden_tensors",
]
