"""Cast formats: ``fp32``, ``bf16``, ``fp16`` (a plain ``nn.Linear`` in that dtype).

fp16 matmuls run on CPU in torch 2.13 (checked by the tests), so all three list cpu and cuda.
Bytes: ``(in*out + out*bias) * itemsize`` (weight and bias both cast).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mpsearch.formats.base import Format, register_format


@dataclass(frozen=True)
class CastFormat(Format):
    """The layer in another floating dtype (weight and bias cast, computed in that dtype).

    Example:
        >>> from mpsearch.formats import get_format
        >>> get_format("bf16").storage_bytes(256, 128, bias=True)
        65792
    """

    dtype: torch.dtype = torch.float32

    def storage_bytes(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32) -> int:
        size = torch.empty((), dtype=self.dtype).element_size()
        return (in_features * out_features + (out_features if bias else 0)) * size

    def compute_dtype(self, layer_dtype: torch.dtype) -> torch.dtype:
        return self.dtype

    def build(self, linear: nn.Linear) -> nn.Module:
        # skip_init: no random init of a weight overwritten at once (it was most of the cost)
        out = nn.utils.skip_init(nn.Linear, linear.in_features, linear.out_features, bias=linear.bias is not None,
                                 device=linear.weight.device, dtype=self.dtype)
        out.weight.copy_(linear.weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
        out.requires_grad_(linear.weight.requires_grad)
        return out

    def dequantized(self, inner: nn.Module) -> torch.Tensor:
        return inner.weight.detach().float()


FP32 = register_format(CastFormat("fp32", 32, description="float32 (cast)", dtype=torch.float32))
BF16 = register_format(CastFormat("bf16", 16, description="bfloat16 (cast)", dtype=torch.bfloat16))
FP16 = register_format(CastFormat("fp16", 16, description="float16 (cast)", dtype=torch.float16))
