"""bitsandbytes formats: ``bnb.int8`` (LLM.int8), ``bnb.nf4``, ``bnb.fp4``.

bitsandbytes is imported only when a module is built (its import is slow and chatty).

``bnb.int8``: ``Linear8bitLt(has_fp16_weights=False, threshold=6.0)``. Stores int8 weights
with one fp32 absmax per output row (``SCB``). In eval mode the activations are quantized
to int8 too (rows of fp16-cast activations; input columns with an |x| > 6 outlier run in
fp16 against the dequantized weights), so it is not weight-only. In bitsandbytes 0.50 on
CPU, *train* mode takes another path (``MatMul8bitFp``: dequantized weights, float
matmul); mpsearch measures and evaluates in eval mode. bitsandbytes logs a warning on every
fp32/bf16 call ("inputs will be cast ... to float16"); mpsearch drops that one message.
Bytes: ``in*out + 4*out + bias``.

``bnb.nf4`` / ``bnb.fp4``: ``Linear4bit``, blocksize 64 over the flattened weight, no
double quantization (``compress_statistics=False``), fp32 absmax, compute dtype = the
layer's dtype, weight-only. bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks the weight
on the first eval-mode call into a layout whose kernel computes in bf16 with bf16 absmax,
asserts ``out % 32 == 0`` and ``in % 64 == 0``, changes the stored tensors and, without the
optional ``kernels`` package, ran slower here than the plain path. mpsearch switches that
repack off (``support_avx512bf16_for_cpu = False``) so the format means the same thing on
every CPU, in train and eval mode, for every shape, and its bytes never change after
construction. Bytes: ``ceil(in*out/2)`` (two codes per byte) ``+ 4*ceil(in*out/64)``
(absmax) ``+ 64`` (the 16-entry fp32 code book each quant state carries) ``+ bias``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.formats.base import Format, register_format, register_hidden_tensors

BLOCKSIZE = 64
THRESHOLD = 6.0
_INSTALL = "pip install 'bitsandbytes>=0.45'"
_registered_walkers = False


class _DropCastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


def _bnb() -> Any:
    """Import bitsandbytes, register how to count its hidden tensors, quiet its per-call log."""
    global _registered_walkers
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise MpsError(f"bitsandbytes formats need bitsandbytes: {_INSTALL} ({exc})") from None
    if not _registered_walkers:
        register_hidden_tensors(bnb.nn.Linear8bitLt, _int8_tensors)
        register_hidden_tensors(bnb.nn.Linear4bit, _4bit_tensors)
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropCastWarning())
        _registered_walkers = True
    return bnb


def _bias_bytes(out_features: int, bias: bool, dtype: torch.dtype) -> int:
    return out_features * torch.empty((), dtype=dtype).element_size() if bias else 0


def _int8_tensors(m: nn.Module) -> Iterator[torch.Tensor]:
    for holder in (m.weight, getattr(m, "state", None)):
        for attr in ("CB", "SCB"):
            t = getattr(holder, attr, None)
            if isinstance(t, torch.Tensor):
                yield t


def _quant_state_tensors(qs: Any) -> Iterator[torch.Tensor]:
    if qs is None:
        return
    for attr in ("absmax", "code", "offset"):
        t = getattr(qs, attr, None)
        if isinstance(t, torch.Tensor):
            yield t
    yield from _quant_state_tensors(getattr(qs, "state2", None))


def _4bit_tensors(m: nn.Module) -> Iterator[torch.Tensor]:
    yield from _quant_state_tensors(getattr(m.weight, "quant_state", None))


def _copy_bias(dst: nn.Module, linear: nn.Linear) -> None:
    if linear.bias is not None:
        dst.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)


@dataclass(frozen=True)
class BnbInt8Format(Format):
    """LLM.int8 (``bnb.nn.Linear8bitLt``, outlier threshold 6.0); see the module docstring.

    Example:
        >>> from mpsearch.formats import get_format
        >>> get_format("bnb.int8").storage_bytes(256, 128, bias=True)   # 32768 + 512 + 512
        33792
    """

    def storage_bytes(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32) -> int:
        return in_features * out_features + 4 * out_features + _bias_bytes(out_features, bias, dtype)

    def check_device(self, device: str | torch.device) -> None:
        super().check_device(device)
        _bnb()

    def build(self, linear: nn.Linear) -> nn.Module:
        bnb = _bnb()
        m = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=THRESHOLD, device="meta")
        m.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
        _copy_bias(m, linear)
        m = m.to(linear.weight.device)  # bitsandbytes quantizes on .to(device)
        if m.weight.dtype != torch.int8:
            raise MpsError(f"bnb.int8: bitsandbytes did not quantize the weight (dtype {m.weight.dtype})")
        return m.eval()

    def dequantized(self, inner: nn.Module) -> torch.Tensor:
        scb = inner.weight.SCB if inner.weight.SCB is not None else inner.state.SCB
        return inner.weight.data.float() * (scb.float().unsqueeze(1) / 127.0)


@dataclass(frozen=True)
class Bnb4bitFormat(Format):
    """bitsandbytes 4-bit (``bnb.nn.Linear4bit``, blocksize 64); see the module docstring.

    Example:
        >>> from mpsearch.formats import get_format
        >>> get_format("bnb.nf4").storage_bytes(256, 128, bias=False)   # 16384 + 2048 + 64
        18496
    """

    quant_type: str = "nf4"

    def storage_bytes(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32) -> int:
        n = in_features * out_features
        return (n + 1) // 2 + 4 * math.ceil(n / BLOCKSIZE) + 16 * 4 + _bias_bytes(out_features, bias, dtype)

    def check_device(self, device: str | torch.device) -> None:
        super().check_device(device)
        _bnb()

    def build(self, linear: nn.Linear) -> nn.Module:
        bnb = _bnb()
        dtype = linear.weight.dtype
        m = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=dtype, compress_statistics=False, quant_type=self.quant_type,
                              quant_storage=torch.uint8, device="meta")
        m.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, blocksize=BLOCKSIZE,
                                     compress_statistics=False, quant_type=self.quant_type,
                                     quant_storage=torch.uint8, module=m)
        _copy_bias(m, linear)
        m.support_avx512bf16_for_cpu = False  # see the module docstring
        m = m.to(linear.weight.device)
        qs = m.weight.quant_state
        if qs is None or m.weight.dtype != torch.uint8 or qs.blocksize != BLOCKSIZE or qs.nested:
            raise MpsError(f"{self.name}: bitsandbytes did not build the expected 4-bit weight")
        return m.eval()

    def dequantized(self, inner: nn.Module) -> torch.Tensor:
        bnb = _bnb()
        return bnb.functional.dequantize_4bit(inner.weight.data, inner.weight.quant_state).float()


BNB_INT8 = register_format(BnbInt8Format("bnb.int8", 8, weight_only=False,
                                         description="bitsandbytes LLM.int8 (Linear8bitLt, threshold 6.0)"))
BNB_NF4 = register_format(Bnb4bitFormat("bnb.nf4", 4, description="bitsandbytes NF4 (Linear4bit, blocksize 64)",
                                        quant_type="nf4"))
BNB_FP4 = register_format(Bnb4bitFormat("bnb.fp4", 4, description="bitsandbytes FP4 (Linear4bit, blocksize 64)",
                                        quant_type="fp4"))
