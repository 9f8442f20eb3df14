"""``rtn.int8ch``, ``rtn.int4g128``: symmetric round-to-nearest formats that serving engines hold exactly.

These two exist so a searched policy can be exported bit for bit to a compressed-tensors
checkpoint that vLLM serves (:mod:`mpsearch.export`): their numerics are exactly
compressed-tensors' symmetric integer schemes, the ones llm-compressor's ``W8A16`` and
``W4A16`` presets write and vLLM runs with its Marlin / machete kernels.

- ``rtn.int8ch``: int8 codes in ``[-128, 127]``, one scale per output row
  (compressed-tensors ``strategy: channel``), weight-only.
- ``rtn.int4g128``: int4 codes in ``[-8, 7]``, one scale per group of 128 consecutive
  weights along ``in_features`` (``strategy: group, group_size: 128``), weight-only.
  ``in_features`` must be a multiple of 128 (compressed-tensors and vLLM's kernels need
  whole groups); other layers are refused, never padded.

Both: ``scale = absmax / ((2**bits - 1) / 2)`` (compressed-tensors' ``calculate_qparams`` for a
symmetric min-max observer: ``absmax / 127.5`` and ``absmax / 7.5``), stored in the layer's
own dtype; ``q = clamp(round(w / scale), -2**(bits-1), 2**(bits-1) - 1)`` computed from the
stored scale; the weight used is ``q.to(scale.dtype) * scale``, the same single operation
compressed-tensors' ``dequantize`` performs, so a checkpoint written from these codes
decompresses to exactly the weight mpsearch ran with. Forward dequantizes per call with plain
torch ops (cpu and cuda), like the other ``rtn.*`` formats: honest memory, speed measured.

Bytes: codes (``in*out`` for int8; ``ceil(in*out/2)`` packed for int4) + scales
(``out * groups * itemsize`` of the layer's dtype) + bias in the layer's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.formats.base import Format, register_format
from mpsearch.formats.rtn import pack_codes, unpack_codes


def quantize_symmetric(w: torch.Tensor, bits: int, group: int | None,
                       scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric RTN: ``(codes int8 [out, in] in [-2**(bits-1), 2**(bits-1)-1], scale [out, groups])``.

    ``group=None`` means one scale per output row. Example:
        >>> q, s = quantize_symmetric(torch.tensor([[1.0, -2.0, 0.5, 0.0]]), 4, None, torch.float32)   # -2 / (2 / 7.5) rounds to -7
        >>> q.tolist(), s.shape
        ([[4, -7, 2, 0]], torch.Size([1, 1]))
    """
    out_f, in_f = w.shape
    g = in_f if group is None else group
    if in_f % g:
        raise MpsError(f"symmetric RTN: in_features {in_f} is not a multiple of the group size {g}")
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    grouped = w.detach().float().reshape(out_f, in_f // g, g)
    absmax = grouped.abs().amax(dim=2)
    tiny = torch.finfo(scale_dtype).tiny
    scale = (absmax / ((qmax - qmin) / 2)).clamp_min(tiny).to(scale_dtype)
    if not torch.isfinite(scale).all():
        raise MpsError(f"symmetric RTN: weights outside the range of {str(scale_dtype).replace('torch.', '')} scales "
                       f"(max |w| {w.abs().max().item():.3g})")
    q = torch.round(grouped / scale.float().unsqueeze(2)).clamp(qmin, qmax)
    return q.to(torch.int8).reshape(out_f, in_f), scale


def dequantize_symmetric(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes.to(scale.dtype) * scale`` per group, in the scale's dtype, ``[out, in]``."""
    out_f, in_f = codes.shape
    groups = scale.shape[1]
    w = codes.reshape(out_f, groups, in_f // groups).to(scale.dtype) * scale.unsqueeze(2)
    return w.reshape(out_f, in_f)


class SymRTNLinear(nn.Module):
    """A Linear stored as symmetric int8/int4 codes plus per-row or per-group scales.

    ``qweight`` holds int8 codes ``[out, in]`` (8 bits) or the int4 codes offset by 8 and
    packed two per byte (:func:`mpsearch.formats.rtn.pack_codes`). Example:
        >>> m = SymRTNLinear.from_linear(torch.nn.Linear(128, 8), bits=4, group=128)
        >>> m(torch.randn(2, 128)).shape
        torch.Size([2, 8])
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group: int | None,
                 qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group: int | None) -> "SymRTNLinear":
        codes, scale = quantize_symmetric(linear.weight, bits, group, linear.weight.dtype)
        packed = codes if bits == 8 else pack_codes((codes.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8), bits)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.in_features, linear.out_features, bits, group, packed, scale, bias)

    def codes(self) -> torch.Tensor:
        """The signed int8 codes ``[out, in]`` (the values compressed-tensors stores)."""
        if self.bits == 8:
            return self.qweight
        n = self.in_features * self.out_features
        u = unpack_codes(self.qweight, self.bits, n).to(torch.int16) - 2 ** (self.bits - 1)
        return u.to(torch.int8).view(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The weight this module uses, in the scale's dtype ``[out, in]``."""
        return dequantize_symmetric(self.codes(), self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        g = "channel" if self.group is None else f"group={self.group}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {g}, symmetric"


@dataclass(frozen=True)
class SymRTNFormat(Format):
    """Symmetric round-to-nearest, per channel or per group (module docstring).

    Example:
        >>> from mpsearch.formats import get_format
        >>> get_format("rtn.int4g128").storage_bytes(256, 128, bias=False)   # 16384 + 128*2*4
        17408
        >>> get_format("rtn.int8ch").storage_bytes(256, 128, bias=False)     # 32768 + 128*4
        33280
    """

    group: int | None = None

    def storage_bytes(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32) -> int:
        bits = int(self.bits)
        itemsize = torch.empty((), dtype=dtype).element_size()
        codes = in_features * out_features if bits == 8 else bits * math.ceil(in_features * out_features / 8)
        groups = 1 if self.group is None else in_features // self.group
        return codes + out_features * groups * itemsize + (out_features * itemsize if bias else 0)

    def validate(self, linear: nn.Linear, where: str = "layer") -> None:
        super().validate(linear, where)
        if self.group is not None and linear.in_features % self.group:
            raise MpsError(f"{where}: format {self.name!r} needs in_features a multiple of {self.group} "
                           f"(compressed-tensors and vLLM hold whole groups only); this layer has {linear.in_features}")

    def build(self, linear: nn.Linear) -> nn.Module:
        return SymRTNLinear.from_linear(linear, int(self.bits), self.group)

    def dequantized(self, inner: nn.Module) -> torch.Tensor:
        return inner.dequantize().float()


RTN_INT8CH = register_format(SymRTNFormat(
    "rtn.int8ch", 8, description="symmetric int8 per output channel, weight-only (compressed-tensors W8A16)"))
RTN_INT4G128 = register_format(SymRTNFormat(
    "rtn.int4g128", 4, group=128, description="symmetric int4, group 128, weight-only (compressed-tensors W4A16)"))
