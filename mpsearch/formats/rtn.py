"""``rtn.int4``, ``rtn.int3``, ``rtn.int2``: mpsearch's own group-wise round-to-nearest formats.

Weight-only, asymmetric, groups of 64 consecutive weights along ``in_features`` (a last,
shorter group when ``in_features % 64 != 0``). Per group an fp16 ``scale`` and an fp16
(fractional) ``zero``: ``w ~ (q - zero) * scale`` with ``q`` in ``[0, 2**bits - 1]``,
``scale = (max - min) / (2**bits - 1)``, ``zero = -min / scale``; ``q`` is computed from the
fp16-rounded scale and zero, so dequantization reproduces exactly what was chosen. Codes are
bit-packed into uint8: each run of 8 codes (row-major over ``[out, in]``) fills ``bits``
bytes, little-endian. Forward unpacks and dequantizes with plain torch ops every call: the
memory is honest, the speed is whatever those ops cost (measure it, never assume it).

Bytes: ``bits * ceil(in*out/8)`` + ``2 * 2 * out * ceil(in/64)`` (fp16 scale and zero) +
bias in the layer's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.formats.base import Format, register_format

GROUP = 64
_MIN_SCALE = 2.0 ** -24  # smallest fp16 subnormal: a constant group still gets a usable scale


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into uint8, 8 codes per ``bits`` bytes.

    Example:
        >>> pack_codes(torch.tensor([1, 2, 3, 0, 1, 2, 3, 0]), 2).tolist()
        [57, 57]
    """
    flat = codes.reshape(-1).to(torch.int64)
    pad = (-flat.numel()) % 8
    words = F.pad(flat, (0, pad)).view(-1, 8)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    word = (words << shifts).sum(dim=1)
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    return ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes, as uint8."""
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # whole codes per byte: scalar shifts of the bytes (faster than broadcasting)
        codes = torch.stack([(packed >> s) & mask for s in range(0, 8, bits)], dim=1)
        return codes.reshape(-1)[:n]
    b = packed.view(-1, bits).to(torch.int32)
    word = b[:, 0].clone()
    for i in range(1, bits):
        word |= b[:, i] << (8 * i)
    codes = torch.stack([(word >> (bits * i)) & mask for i in range(8)], dim=1)
    return codes.to(torch.uint8).reshape(-1)[:n]


def _grouped(w: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` -> ``[out, groups, 64]`` fp32, the tail padded with NaN."""
    out_f, in_f = w.shape
    groups = math.ceil(in_f / GROUP)
    padded = F.pad(w.float(), (0, groups * GROUP - in_f), value=float("nan"))
    return padded.view(out_f, groups, GROUP)


def quantize_rtn(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric RTN: ``(codes uint8 [out, in], scale fp16 [out, G], zero fp16 [out, G])``."""
    levels = 2 ** bits - 1
    g = _grouped(w)
    valid = ~torch.isnan(g)
    gmin = torch.where(valid, g, torch.full_like(g, float("inf"))).amin(dim=2)
    gmax = torch.where(valid, g, torch.full_like(g, float("-inf"))).amax(dim=2)
    scale = ((gmax - gmin) / levels).clamp_min(_MIN_SCALE).to(torch.float16)
    zero = (-gmin / scale.float()).to(torch.float16)
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        raise MpsError(f"rtn.int{bits}: weights outside the fp16 range of scales and zero points (max |w| {w.abs().max().item():.3g})")
    q = torch.round(g / scale.float().unsqueeze(2) + zero.float().unsqueeze(2)).clamp(0, levels)
    codes = q.nan_to_num(0).to(torch.uint8).view(w.shape[0], -1)[:, : w.shape[1]]
    return codes, scale, zero


def dequantize_rtn(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * scale`` per group, fp32 ``[out, in]``."""
    out_f, in_f = codes.shape
    groups = scale.shape[1]
    q = codes.float()
    if groups * GROUP != in_f:
        q = F.pad(q, (0, groups * GROUP - in_f))
    w = (q.view(out_f, groups, GROUP) - zero.float().unsqueeze(2)) * scale.float().unsqueeze(2)
    return w.view(out_f, groups * GROUP)[:, :in_f]


class RTNLinear(nn.Module):
    """A Linear whose weight is stored as packed RTN codes and dequantized each forward.

    Example:
        >>> m = RTNLinear.from_linear(torch.nn.Linear(100, 8), bits=3)
        >>> m(torch.randn(2, 100)).shape
        torch.Size([2, 8])
    """

    def __init__(self, in_features: int, out_features: int, bits: int, qweight: torch.Tensor,
                 scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> "RTNLinear":
        codes, scale, zero = quantize_rtn(linear.weight.detach(), bits)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.in_features, linear.out_features, bits, pack_codes(codes, bits), scale, zero, bias)

    def dequantize(self) -> torch.Tensor:
        """The fp32 ``[out, in]`` weight this module uses."""
        codes = unpack_codes(self.qweight, self.bits, self.in_features * self.out_features)
        return dequantize_rtn(codes.view(self.out_features, self.in_features), self.scale, self.zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group={GROUP}"


@dataclass(frozen=True)
class RTNFormat(Format):
    """Group-wise (64) asymmetric round-to-nearest, fp16 scale and zero (module docstring).

    Example:
        >>> from mpsearch.formats import get_format
        >>> get_format("rtn.int3").storage_bytes(256, 128, bias=False)   # 12288 + 2048
        14336
    """

    def storage_bytes(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32) -> int:
        bits = int(self.bits)
        codes = bits * math.ceil(in_features * out_features / 8)
        qparams = 2 * 2 * out_features * math.ceil(in_features / GROUP)
        bias_bytes = out_features * torch.empty((), dtype=dtype).element_size() if bias else 0
        return codes + qparams + bias_bytes

    def build(self, linear: nn.Linear) -> nn.Module:
        return RTNLinear.from_linear(linear, int(self.bits))

    def _dequantize_weight(self, linear: nn.Linear) -> torch.Tensor:
        # the module's weight without packing the codes (pack / unpack is the identity)
        return dequantize_rtn(*quantize_rtn(linear.weight.detach(), int(self.bits)))

    def dequantized(self, inner: nn.Module) -> torch.Tensor:
        return inner.dequantize()


RTN_INT4 = register_format(RTNFormat("rtn.int4", 4, description="round-to-nearest int4, group 64, fp16 scale+zero"))
RTN_INT3 = register_format(RTNFormat("rtn.int3", 3, description="round-to-nearest int3, group 64, fp16 scale+zero"))
RTN_INT2 = register_format(RTNFormat("rtn.int2", 2, description="round-to-nearest int2, group 64, fp16 scale+zero"))
