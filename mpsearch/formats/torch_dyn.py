"""``torch.int8dyn``: PyTorch dynamic int8 (``torch.ao.nn.quantized.dynamic.Linear``), CPU only.

Weights int8 with one scale per output row (``per_channel_dynamic_qconfig``); activations
are quantized per call (uint8, per tensor, dynamic range), so it is not weight-only. The
engine is ``torch.backends.quantized.engine`` (``x86`` = fbgemm/oneDNN on this machine).
It computes in fp32 (a bf16 layer is cast in and out by the wrapper).

Bytes, as torch exposes the module's tensors (``_packed_params._weight_bias()``):
``in*out`` int8 weights + ``8*out`` float64 scales + ``8*out`` int64 zero points +
``4*out`` fp32 bias. The backend also keeps an opaque prepacked copy of the weights for its
kernel, which Python cannot see and which is not counted: creating a 4096x4096 module here
grew resident memory by 23.4 MB against 16.2 MB counted.

torch 2.13 warns that quantized tensor creation functions are deprecated; mpsearch keeps the
format (it is the fast int8 path on CPUs) and silences that warning while building.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.formats.base import Format, register_format, register_hidden_tensors


def _dq_module() -> type:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return DynamicQuantizedLinear


def _packed_tensors(m: nn.Module) -> Iterator[torch.Tensor]:
    w, b = m._packed_params._weight_bias()
    yield w.int_repr()
    yield w.q_per_channel_scales()
    yield w.q_per_channel_zero_points()
    if b is not None:
        yield b


@dataclass(frozen=True)
class TorchDynamicInt8Format(Format):
    """PyTorch dynamic int8, per-channel weights (see the module docstring).

    Example:
        >>> from mpsearch.formats import get_format
        >>> get_format("torch.int8dyn").storage_bytes(256, 128, bias=True)   # 32768 + 128*(8+8+4)
        35328
    """

    def storage_bytes(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32) -> int:
        return in_features * out_features + 16 * out_features + (4 * out_features if bias else 0)

    def compute_dtype(self, layer_dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def check_device(self, device: str | torch.device) -> None:
        super().check_device(device)
        engine = torch.backends.quantized.engine
        if engine not in ("x86", "fbgemm", "onednn", "qnnpack"):
            raise MpsError(
                f"format {self.name!r} needs a quantized engine; torch.backends.quantized.engine is {engine!r}, "
                f"supported here: {', '.join(torch.backends.quantized.supported_engines)}"
            )

    def build(self, linear: nn.Linear) -> nn.Module:
        from torch.ao.quantization import per_channel_dynamic_qconfig

        ref = nn.utils.skip_init(nn.Linear, linear.in_features, linear.out_features, bias=linear.bias is not None)
        ref.weight.copy_(linear.weight)
        if linear.bias is not None:
            ref.bias.copy_(linear.bias)
        ref.qconfig = per_channel_dynamic_qconfig
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*deprecated.*")
            warnings.filterwarnings("ignore", message=".*quantize_per_.*deprecated.*")
            return _dq_module().from_float(ref)

    def _dequantize_weight(self, linear: nn.Linear) -> torch.Tensor:
        # from_float's own weight quantization (observer, qparams, quantize_per_channel)
        # without the three prepack calls it makes; prepacking int8 codes is lossless
        from torch.ao.nn.quantized.modules.utils import _quantize_weight
        from torch.ao.quantization import per_channel_dynamic_qconfig

        w = linear.weight.detach().float()
        observer = per_channel_dynamic_qconfig.weight()
        observer(w)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantize_per_.*deprecated.*")
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*deprecated.*")
            return _quantize_weight(w, observer).dequantize()

    def dequantized(self, inner: nn.Module) -> torch.Tensor:
        w, _ = inner._packed_params._weight_bias()
        return w.dequantize().float()


register_hidden_tensors(_dq_module(), _packed_tensors)
TORCH_INT8DYN = register_format(TorchDynamicInt8Format(
    "torch.int8dyn", 8, devices=frozenset({"cpu"}), weight_only=False,
    description="PyTorch dynamic int8 (per-channel weights, dynamic activations)"))
