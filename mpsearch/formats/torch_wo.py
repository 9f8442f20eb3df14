"""``torch.int8wo``, ``torch.int4wo``: PyTorch's own weight-only CPU kernels, bf16 activations.

Both compute in bf16 on CPU only (an fp32 or fp16 layer's input is cast to bf16 by
:class:`~mpsearch.formats.base.QuantizedLinear` and the output cast back to the caller's
dtype). The bias is kept in the layer's dtype and added after the kernel.

- ``torch.int8wo``: int8 codes, one bf16 scale per output channel (symmetric:
  ``scale = absmax / 127`` rounded to bf16, ``q = clamp(round(w / scale), -128, 127)``
  from the rounded scale), computed by ``torch.ops.aten._weight_int8pack_mm(x, q, scale)``
  (``x @ q.T * scale``). The weight it uses is ``q * scale``. The kernel needs
  ``in_features`` a multiple of 16: on this machine's AVX-512 path other widths crash the
  process (a segmentation fault, not an error), so they are refused.
- ``torch.int4wo``: int4 asymmetric, groups of 64 consecutive weights along ``in_features``
  (the groups of ``rtn.int4``). Per group a bf16 ``scale = (max - min) / 15`` and a bf16
  ``zero = min + 8 * scale`` (the kernel's zero-point convention), codes
  ``q = clamp(round((w - zero) / scale + 8), 0, 15)`` from the rounded values; the kernel
  computes with ``(q - 8) * scale + zero`` in fp32 (checked against it to bf16 output
  rounding). Codes are packed by ``aten._convert_weight_to_int4pack_for_cpu`` (uint8
  ``[out, in / 2]``) and multiplied by ``aten._weight_int4pack_mm_for_cpu``; scales and
  zeros are one bf16 tensor ``[in / 64, out, 2]``. The kernels need ``out_features`` a
  multiple of 16 and ``in_features`` a multiple of 64 (whole groups); other layers are
  refused, never padded.

Bytes (exactly the module's tensors):
``torch.int8wo``: ``in*out`` (int8) + ``2*out`` (bf16 scales) + bias;
``torch.int4wo``: ``in*out/2`` (packed) + ``4*out*in/64`` (bf16 scale and zero) + bias;
bias in the layer's dtype. So ``bits_per_weight`` is ``8 + 16/in`` and ``4 + 32/64``.

Speed (benchmarks/format_speed.py, docs/benchmarks.md): fast for one decode row on large
layers, slower than fp32 for 64-row prefill. Measure, never assume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.formats.base import Format, register_format

GROUP = 64            #: int4 group size along in_features
INT8_K_MULTIPLE = 16  #: _weight_int8pack_mm: in_features must be a multiple of this
INT4_N_MULTIPLE = 16  #: _convert_weight_to_int4pack_for_cpu: out_features must be a multiple of this
#: The CPU int4 packer's block of output rows by what its kernel was built for (see
#: :func:`unpack_int4_cpu`): 64 with AVX-512, 32 with AVX2 (read off torch 2.13 on both).
_PACK_BLOCKS_N = (64, 32)
_pack_block_n: int | None = None
_INNER_K_TILES = 2    #: argument of the packer (its CPU layout does not depend on it)

_OPS = {
    "torch.int8wo": ("_weight_int8pack_mm",),
    "torch.int4wo": ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
}


def _check_cpu(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu":
            raise MpsError(f"format {name!r} runs on cpu only (PyTorch's CPU weight-only kernel); got a tensor on "
                           f"{t.device.type}: keep the model on cpu or use a format for {t.device.type}")


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    return x.reshape(-1, in_features).contiguous()


def _finite(name: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        raise MpsError(f"format {name!r}: the weight holds inf or NaN values; it cannot be quantized")


# -- int8, per output channel ----------------------------------------------------------------
def quantize_int8_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(codes int8 [out, in], scales bf16 [out])``, codes from the rounded scales.

    Example:
        >>> q, s = quantize_int8_channel(torch.tensor([[1.0, -0.5], [0.0, 0.0]]))
        >>> q.tolist(), s.dtype
        ([[127, -64], [0, 0]], torch.bfloat16)
    """
    wf = w.detach().float()
    absmax = wf.abs().amax(dim=1)
    scale = (absmax / 127.0).clamp_min(torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    q = torch.round(wf / scale.float().unsqueeze(1)).clamp(-128, 127).to(torch.int8)
    return q, scale


class Int8WeightOnlyLinear(nn.Module):
    """int8 weights + bf16 per-channel scales, run by ``aten._weight_int8pack_mm`` (bf16, CPU).

    Example:
        >>> m = Int8WeightOnlyLinear.from_linear(torch.nn.Linear(32, 8))
        >>> m(torch.randn(2, 32, dtype=torch.bfloat16)).shape
        torch.Size([2, 8])
    """

    def __init__(self, in_features: int, out_features: int, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8WeightOnlyLinear":
        _finite("torch.int8wo", linear.weight)
        q, scale = quantize_int8_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.in_features, linear.out_features, q.contiguous(), scale.contiguous(), bias)

    def dequantize(self) -> torch.Tensor:
        """The fp32 ``[out, in]`` weight the kernel computes with: ``q * scale``."""
        return self.qweight.float() * self.scales.float().unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_cpu("torch.int8wo", x, self.qweight)
        lead = x.shape[:-1]
        x2 = _rows(x.to(torch.bfloat16), self.in_features)
        if x2.shape[0] == 0:
            y = x2.new_zeros((0, self.out_features))
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


# -- int4, groups of 64 ----------------------------------------------------------------------
def quantize_int4_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of 64: ``(codes int32 [out, in] in 0..15, scale bf16 [out, G], zero bf16 [out, G])``.

    ``w ~ (q - 8) * scale + zero`` (the CPU kernel's convention); ``in`` must be a multiple of 64.
    Example:
        >>> q, s, z = quantize_int4_groups(torch.linspace(-1, 1, 64).view(1, 64))
        >>> int(q.min()), int(q.max()), s.shape
        (0, 15, torch.Size([1, 1]))
    """
    out_f, in_f = w.shape
    if in_f % GROUP:
        raise MpsError(f"torch.int4wo: in_features {in_f} is not a multiple of the group size {GROUP}")
    g = w.detach().float().reshape(out_f, in_f // GROUP, GROUP)
    gmin, gmax = g.amin(dim=2), g.amax(dim=2)
    scale = ((gmax - gmin) / 15.0).clamp_min(torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    zero = (gmin + 8.0 * scale.float()).to(torch.bfloat16)
    s, z = scale.float().unsqueeze(2), zero.float().unsqueeze(2)
    q = torch.round((g - z) / s + 8.0).clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
    return q, scale, zero


def unpack_int4_cpu(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Codes (uint8 ``[out, in]``) from ``aten._convert_weight_to_int4pack_for_cpu``'s output.

    The packer's layout (torch 2.13, read from its output): output rows in blocks of ``B`` (64
    where its kernel uses AVX-512, 32 with AVX2; found once per process by packing a probe),
    each block stored as ``[in, B / 2]`` bytes, byte ``j`` holding row ``j`` (low nibble) and
    row ``j + B / 2`` (high nibble); a last block of fewer than ``B`` rows is stored
    ``[in, rows / 2]`` with consecutive rows ``2j`` (low) and ``2j + 1`` (high). Every build
    checks this against the codes it packed.

    Example:
        >>> q = torch.randint(0, 16, (80, 64), dtype=torch.int32)
        >>> p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        >>> torch.equal(unpack_int4_cpu(p, 80, 64).int(), q)
        True
    """
    return _unpack_blocks(packed, out_features, in_features, _packer_block_n())


def _packer_block_n() -> int:
    """The block of output rows this machine's packer uses: the one under which a probe
    matrix (128 rows) unpacks to itself. Raises if none does (a layout mpsearch does not know)."""
    global _pack_block_n
    if _pack_block_n is None:
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=g)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)
        for b in _PACK_BLOCKS_N:
            if torch.equal(_unpack_blocks(packed, 128, 64, b).to(torch.int32), q):
                _pack_block_n = b
                break
        else:
            raise MpsError(f"torch.int4wo: torch {torch.__version__} packs int4 weights in a layout mpsearch does "
                           "not know (blocks of 64 or 32 rows), so the weight its kernel uses cannot be read "
                           "back; use rtn.int4 instead")
    return _pack_block_n


def _unpack_blocks(packed: torch.Tensor, n: int, k: int, b: int) -> torch.Tensor:
    flat = packed.reshape(-1)
    out = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    full = n // b
    if full:
        blk = flat[: full * b * k // 2].view(full, k, b // 2)
        lo, hi = (blk & 15).permute(0, 2, 1), (blk >> 4).permute(0, 2, 1)
        out[: full * b] = torch.cat([lo, hi], dim=1).reshape(full * b, k)
    tail = n - full * b
    if tail:
        blk = flat[full * b * k // 2:].view(k, tail // 2)
        out[full * b::2] = (blk & 15).t()
        out[full * b + 1::2] = (blk >> 4).t()
    return out


class Int4WeightOnlyLinear(nn.Module):
    """Packed int4 weights + bf16 scales and zeros per 64, run by ``aten._weight_int4pack_mm_for_cpu``.

    Example:
        >>> m = Int4WeightOnlyLinear.from_linear(torch.nn.Linear(64, 16))
        >>> m(torch.randn(3, 64, dtype=torch.bfloat16)).shape
        torch.Size([3, 16])
    """

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor,
                 scale_and_zero: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed)
        self.register_buffer("scale_and_zero", scale_and_zero)  # bf16 [in / 64, out, 2]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4WeightOnlyLinear":
        _finite("torch.int4wo", linear.weight)
        q, scale, zero = quantize_int4_groups(linear.weight)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), _INNER_K_TILES)
        if not torch.equal(unpack_int4_cpu(packed, linear.out_features, linear.in_features).to(torch.int32), q):
            raise MpsError(f"torch.int4wo: torch {torch.__version__} packs int4 weights in a layout mpsearch does not "
                           "know, so the weight its kernel uses cannot be read back; use rtn.int4 instead")
        sz = torch.stack([scale.t(), zero.t()], dim=2).contiguous()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.in_features, linear.out_features, packed, sz, bias)

    def dequantize(self) -> torch.Tensor:
        """The fp32 ``[out, in]`` weight the kernel computes with: ``(q - 8) * scale + zero``."""
        n, k = self.out_features, self.in_features
        q = unpack_int4_cpu(self.packed, n, k).float().view(n, k // GROUP, GROUP)
        s = self.scale_and_zero[..., 0].float().t().unsqueeze(2)
        z = self.scale_and_zero[..., 1].float().t().unsqueeze(2)
        return ((q - 8.0) * s + z).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_cpu("torch.int4wo", x, self.packed)
        lead = x.shape[:-1]
        x2 = _rows(x.to(torch.bfloat16), self.in_features)
        if x2.shape[0] == 0:
            y = x2.new_zeros((0, self.out_features))
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scale_and_zero)
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 asymmetric, group={GROUP}"


# -- the formats -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TorchWeightOnlyFormat(Format):
    """PyTorch's CPU weight-only int8 / int4 kernels on bf16 activations (module docstring).

    Example:
        >>> from mpsearch.formats import get_format
        >>> get_format("torch.int8wo").storage_bytes(256, 128, bias=False)   # 32768 + 2*128
        33024
        >>> get_format("torch.int4wo").storage_bytes(256, 128, bias=False)   # 16384 + 4*128*4
        18432
    """

    def storage_bytes(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32) -> int:
        bias_bytes = out_features * torch.empty((), dtype=dtype).element_size() if bias else 0
        if self.bits == 8:
            return in_features * out_features + 2 * out_features + bias_bytes
        return in_features * out_features // 2 + 4 * out_features * math.ceil(in_features / GROUP) + bias_bytes

    def compute_dtype(self, layer_dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16

    def check_device(self, device: str | torch.device) -> None:
        super().check_device(device)
        missing = [op for op in _OPS[self.name] if not hasattr(torch.ops.aten, op)]
        if missing:
            raise MpsError(f"format {self.name!r} needs torch.ops.aten.{missing[0]}, which torch {torch.__version__} "
                           "does not have (PyTorch >= 2.6 ships it)")

    def validate(self, linear: nn.Linear, where: str = "layer") -> None:
        super().validate(linear, where)
        in_f, out_f = linear.in_features, linear.out_features
        if self.bits == 8:
            if in_f % INT8_K_MULTIPLE:
                raise MpsError(f"{where}: format {self.name!r} needs in_features a multiple of {INT8_K_MULTIPLE} "
                               f"(aten._weight_int8pack_mm's CPU kernel); this layer has {in_f}")
            return
        if in_f % GROUP:
            raise MpsError(f"{where}: format {self.name!r} needs in_features a multiple of {GROUP} (whole groups "
                           f"for aten._weight_int4pack_mm_for_cpu); this layer has {in_f}")
        if out_f % INT4_N_MULTIPLE:
            raise MpsError(f"{where}: format {self.name!r} needs out_features a multiple of {INT4_N_MULTIPLE} "
                           f"(aten._convert_weight_to_int4pack_for_cpu); this layer has {out_f}")

    def build(self, linear: nn.Linear) -> nn.Module:
        _check_cpu(self.name, linear.weight)
        return Int8WeightOnlyLinear.from_linear(linear) if self.bits == 8 else Int4WeightOnlyLinear.from_linear(linear)

    def dequantized(self, inner: nn.Module) -> torch.Tensor:
        return inner.dequantize()


TORCH_INT8WO = register_format(TorchWeightOnlyFormat(
    "torch.int8wo", 8, devices=frozenset({"cpu"}),
    description="PyTorch CPU weight-only int8 (per channel, bf16 scales, aten._weight_int8pack_mm)"))
TORCH_INT4WO = register_format(TorchWeightOnlyFormat(
    "torch.int4wo", 4, devices=frozenset({"cpu"}),
    description="PyTorch CPU weight-only int4 (asymmetric, group 64, aten._weight_int4pack_mm_for_cpu)"))
