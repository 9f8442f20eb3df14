"""torchao formats (optional extra ``mpsearch[ao]``): ``ao.int8wo``, ``ao.int4wo``, ``ao.fp8``.

torchao is imported lazily; a missing torchao raises :class:`MpsError` saying
``pip install 'mpsearch[ao]'``. Each format is torchao's ``quantize_`` with its config on a
copy of the layer (checked with torchao 0.18):

- ``ao.int8wo``: ``Int8WeightOnlyConfig()``: int8 weights, one fp32 scale and one int8
  zero point per output row; computes in the layer's dtype; cpu and cuda.
  Bytes: ``in*out + 4*out + out + bias``.
- ``ao.int4wo``: ``Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")``
  (tinygemm kernel; torchao's default "plain" packing needs the separate ``mslk`` package).
  bf16 only (the wrapper casts), CUDA with compute capability >= 8.0; torchao pads the
  weight to ``out`` a multiple of 8 and ``in`` a multiple of 1024. Bytes:
  ``ceil8(out)*ceil1024(in)/2`` (int4) + ``4*ceil8(out)*ceil1024(in)/128`` (bf16 scale and
  zero) + bf16 bias. Formula from torchao's source; not verified on a GPU from here.
- ``ao.fp8``: ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``: e4m3
  weights with an fp32 scale per row, activations quantized per row per call; bf16 compute;
  CUDA with compute capability >= 8.9 (Ada, Hopper). Bytes: ``in*out + 4*out + bf16 bias``.

torchao may pad or reorder further in other versions: the tests compare every formula with
the real module's tensors wherever the format can be built.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.formats.base import Format, device_type, register_format

INSTALL = "pip install 'mpsearch[ao]'"
INT4_GROUP = 128


def _torchao() -> Any:
    try:
        import torchao
        import torchao.quantization  # noqa: F401
    except ImportError as exc:
        raise MpsError(f"torchao formats (ao.*) need torchao: {INSTALL} ({exc})") from None
    return torchao


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class AoFormat(Format):
    """A torchao ``quantize_`` config applied to one Linear (see the module docstring).

    Example:
        >>> from mpsearch.formats import get_format
        >>> get_format("ao.int8wo").storage_bytes(256, 128, bias=False)   # 32768 + 128*(4+1)
        33408
    """

    kind: str = "int8wo"
    min_capability: tuple[int, int] | None = None
    fixed_dtype: torch.dtype | None = None

    def storage_bytes(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32) -> int:
        cdt = self.compute_dtype(dtype)
        bias_bytes = out_features * torch.empty((), dtype=cdt).element_size() if bias else 0
        if self.kind == "int8wo":
            return in_features * out_features + 5 * out_features + bias_bytes
        if self.kind == "int4wo":
            n, k = _ceil(out_features, 8), _ceil(in_features, 1024)
            return n * k // 2 + 2 * 2 * n * (k // INT4_GROUP) + bias_bytes
        return in_features * out_features + 4 * out_features + bias_bytes  # fp8

    def compute_dtype(self, layer_dtype: torch.dtype) -> torch.dtype:
        return self.fixed_dtype or layer_dtype

    def check_device(self, device: str | torch.device) -> None:
        super().check_device(device)
        _torchao()
        if self.min_capability is None or device_type(device) != "cuda":
            return
        if not torch.cuda.is_available():
            raise MpsError(f"format {self.name!r} needs a CUDA GPU with compute capability >= "
                           f"{self.min_capability[0]}.{self.min_capability[1]}; CUDA is not available here")
        dev = torch.device(device)
        cap = torch.cuda.get_device_capability(dev if dev.index is not None else None)
        if tuple(cap) < self.min_capability:
            raise MpsError(f"format {self.name!r} needs compute capability >= {self.min_capability[0]}."
                           f"{self.min_capability[1]}; {torch.cuda.get_device_name(dev)} has {cap[0]}.{cap[1]}")

    def config(self) -> Any:
        """The torchao config object for this format."""
        _torchao()
        from torchao import quantization as q

        if self.kind == "int8wo":
            return q.Int8WeightOnlyConfig()
        if self.kind == "int4wo":
            return q.Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d")
        return q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow())

    def build(self, linear: nn.Linear) -> nn.Module:
        from torchao.quantization import quantize_

        m = copy.deepcopy(linear).to(self.compute_dtype(linear.weight.dtype))
        m.requires_grad_(False)
        try:
            quantize_(m, self.config())
        except Exception as exc:  # torchao raises assorted types; never fall back silently
            raise MpsError(f"{self.name}: torchao could not quantize a {linear.out_features}x{linear.in_features} "
                           f"layer: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        if type(m.weight) in (torch.Tensor, nn.Parameter):
            raise MpsError(f"{self.name}: torchao left the weight unquantized")
        return m

    def dequantized(self, inner: nn.Module) -> torch.Tensor:
        w = inner.weight
        return w.dequantize().float() if hasattr(w, "dequantize") else w.float()


AO_INT8WO = register_format(AoFormat("ao.int8wo", 8, description="torchao int8 weight-only (per-row)", kind="int8wo"))
AO_INT4WO = register_format(AoFormat("ao.int4wo", 4, devices=frozenset({"cuda"}), kind="int4wo",
                                     description="torchao int4 weight-only, group 128 (tinygemm)",
                                     min_capability=(8, 0), fixed_dtype=torch.bfloat16))
AO_FP8 = register_format(AoFormat("ao.fp8", 8, devices=frozenset({"cuda"}), weight_only=False, kind="fp8",
                                  description="torchao fp8 e4m3 dynamic, per-row (Ada/Hopper)",
                                  min_capability=(8, 9), fixed_dtype=torch.bfloat16))
