"""The format abstraction, the registry and exact byte counting.

A :class:`Format` is a named way to run one ``nn.Linear`` (DESIGN.md, "Formats"). Backends
subclass it and add instances with :func:`register_format`; nothing else needs to change
(the same idea as torchao's config registry behind ``quantize_``).

Every module a format builds is a :class:`QuantizedLinear`: a thin wrapper that casts the
input to the format's compute dtype, runs the real backend module (``.inner``) and casts the
output back to the input's dtype, so a bf16 layer inside an fp32 model just works. The
wrapper records the format (``_mps_format``) so :func:`mpsearch.formats.current_formats`
and a second :func:`mpsearch.formats.apply_policy` can tell what a layer is.

**What "bytes" means** (:func:`module_bytes`, ``Format.storage_bytes``): the sum of
``nbytes`` over the distinct storages of every tensor the module keeps: parameters,
buffers, and the tensors backends hide outside them (bitsandbytes' ``quant_state``:
``absmax``, ``code`` and nested statistics; ``Int8Params.SCB`` / ``MatmulLtState.SCB``;
the unpacked weight, per-channel scales, zero points and bias of PyTorch's dynamic
quantized Linear; the inner tensors of torchao tensor subclasses). A tensor shared by two
modules (a tied ``lm_head``) is counted once. Opaque backend copies that Python cannot see
(fbgemm's prepacked weight matrix) are not counted: see ``mpsearch.formats.torch_dyn``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from mpsearch.errors import MpsError

DTYPE_FORMATS: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DEVICES = frozenset({"cpu", "cuda"})


def device_type(device: str | torch.device | None) -> str:
    """``"cpu"`` / ``"cuda"`` / ... from a device spec (``"cuda:1"`` -> ``"cuda"``).

    Example:
        >>> device_type("cuda:1")
        'cuda'
    """
    if device is None:
        return "cpu"
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        raise MpsError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N") from None


def dtype_format(dtype: torch.dtype, where: str = "layer") -> str:
    """The cast format a floating dtype corresponds to (``torch.bfloat16`` -> ``"bf16"``)."""
    try:
        return DTYPE_FORMATS[dtype]
    except KeyError:
        valid = ", ".join(str(d).replace("torch.", "") for d in DTYPE_FORMATS)
        raise MpsError(f"{where} has dtype {str(dtype).replace('torch.', '')}; mpsearch handles {valid} layers") from None


@dataclass(frozen=True)
class Format:
    """A named way to run one ``nn.Linear``; subclass per backend and register instances.

    Attributes:
        name: backend-qualified name (``"bnb.nf4"``).
        bits: nominal bits per weight, without scales (use :meth:`bits_per_weight` for the
            effective figure).
        devices: device types it can run on at all (``check_device`` refines: libraries,
            GPU generation).
        weight_only: True when the module computes ``x @ quantize_weight(W).T + b`` (up to
            float rounding of the matmul); False when activations are quantized too.
        description: one line for tables.

    Example:
        >>> from mpsearch.formats import get_format
        >>> f = get_format("rtn.int4")
        >>> f.storage_bytes(256, 128, bias=False)   # 4-bit codes + fp16 scale and zero per 64
        18432
    """

    name: str
    bits: float
    devices: frozenset = DEVICES
    weight_only: bool = True
    description: str = ""

    # -- what a backend implements --------------------------------------------------------
    def storage_bytes(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32) -> int:
        """Exact bytes the module built from such a layer keeps (see the module docstring).

        ``dtype`` is the original layer's dtype: biases (and some backends' scales) keep it.
        """
        raise NotImplementedError

    def build(self, linear: nn.Linear) -> nn.Module:
        """The backend module for ``linear`` (inputs arrive in :meth:`compute_dtype`)."""
        raise NotImplementedError

    def dequantized(self, inner: nn.Module) -> torch.Tensor:
        """The weight a module from :meth:`build` effectively uses, as fp32 ``[out, in]``."""
        raise NotImplementedError

    def compute_dtype(self, layer_dtype: torch.dtype) -> torch.dtype:
        """The dtype the backend module computes in, given the original layer's dtype."""
        return layer_dtype

    def validate(self, linear: nn.Linear, where: str = "layer") -> None:
        """Raise :class:`MpsError` if this layer cannot take the format (shape, dtype, device)."""
        dtype_format(linear.weight.dtype, where)
        self.check_device(linear.weight.device)

    # -- shared behaviour -----------------------------------------------------------------
    def check_device(self, device: str | torch.device) -> None:
        """Raise :class:`MpsError` unless the format can run on ``device``.

        Example:
            >>> from mpsearch.formats import get_format
            >>> get_format("torch.int8dyn").check_device("cuda")
            Traceback (most recent call last):
            ...
            mpsearch.errors.MpsError: format 'torch.int8dyn' cannot run on cuda (it runs on: cpu); formats for cuda: ...
        """
        dev = device_type(device)
        if dev not in self.devices:
            others = ", ".join(n for n, f in FORMATS.items() if dev in f.devices) or "none"
            raise MpsError(
                f"format {self.name!r} cannot run on {dev} (it runs on: {', '.join(sorted(self.devices))}); "
                f"formats for {dev}: {others}"
            )

    def make_module(self, linear: nn.Linear) -> "QuantizedLinear":
        """A real module running ``linear`` in this format; the input's dtype is kept.

        The original ``linear`` is not modified. Raises :class:`MpsError` if it cannot take
        the format. Example:
            >>> import torch
            >>> from mpsearch.formats import get_format
            >>> m = get_format("bf16").make_module(torch.nn.Linear(8, 4))
            >>> m(torch.randn(2, 8)).dtype
            torch.float32
        """
        self.validate(linear)
        layer_dtype = linear.weight.dtype
        with torch.no_grad():
            inner = self.build(linear)
        return QuantizedLinear(inner, self.name, linear.in_features, linear.out_features,
                               linear.bias is not None, layer_dtype, self.compute_dtype(layer_dtype))

    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The fp32 weight the real kernel effectively uses for ``w`` (``[out, in]``).

        Built through the real module, so ``||quantize_weight(W) - W||`` is the error the
        model sees. Example:
            >>> import torch
            >>> from mpsearch.formats import get_format
            >>> w = torch.randn(4, 64)
            >>> bool((get_format("rtn.int2").quantize_weight(w) - w).abs().max() > 0)
            True
        """
        if w.dim() != 2:
            raise MpsError(f"format {self.name!r}: quantize_weight expects a 2-D [out, in] weight, got shape {tuple(w.shape)}")
        # on the meta device: no random init of a weight that is overwritten at once (that init
        # was half the cost of a cast's quantize_weight, a large share of the hessian profile)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
        lin.weight = nn.Parameter(w.detach(), requires_grad=False)
        self.validate(lin)  # the module path's refusals (shape, dtype, device), whichever path runs
        with torch.no_grad():
            return self._dequantize_weight(lin).to(torch.float32)

    def _dequantize_weight(self, linear: nn.Linear) -> torch.Tensor:
        """``dequantized(build(linear))`` for a validated, bias-free ``linear``.

        This default builds the real module. A format overrides it where it can compute the
        same tensor without the kernel's packing (``tests/test_formats_fast_dequant.py`` checks
        every registered format: the override equals the module's weight exactly).
        """
        return self.dequantized(self.build(linear))

    def bits_per_weight(self, in_features: int, out_features: int) -> float:
        """Effective bits per weight including scales and metadata (no bias)."""
        return 8.0 * self.storage_bytes(in_features, out_features, bias=False) / (in_features * out_features)


class QuantizedLinear(nn.Module):
    """A format's module standing in for one ``nn.Linear`` (created by :meth:`Format.make_module`).

    ``inner`` is the real backend module; forward casts the input to ``compute_dtype`` and
    the output back to the input's dtype. ``_mps_format`` names the format.
    """

    def __init__(self, inner: nn.Module, fmt: str, in_features: int, out_features: int,
                 bias: bool, layer_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self._mps_format = fmt
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = bias
        self.layer_dtype = layer_dtype
        self.compute_dtype = compute_dtype

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias the backend keeps (None without one), so code reading ``.bias`` of Linears works."""
        if not self.has_bias:
            return None
        b = getattr(self.inner, "bias", None)
        return b() if callable(b) else b  # torch's dynamic quantized Linear has a bias() method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x if x.dtype == self.compute_dtype else x.to(self.compute_dtype))
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"format={self._mps_format}, in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"


# -- registry --------------------------------------------------------------------------------
FORMATS: dict[str, Format] = {}


def register_format(fmt: Format, *, replace: bool = False) -> Format:
    """Add a format to the registry (a new backend calls this; nothing else changes).

    Example:
        >>> from mpsearch.formats import FORMATS, register_format, get_format
        >>> register_format(get_format("fp32"), replace=True).name
        'fp32'
    """
    if not isinstance(fmt, Format):
        raise MpsError(f"register_format expects a Format, got {type(fmt).__name__}")
    if fmt.name in FORMATS and not replace and FORMATS[fmt.name] is not fmt:
        raise MpsError(f"format {fmt.name!r} is already registered; pass replace=True to override it")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The registered format called ``name``; unknown names raise listing the valid ones.

    Example:
        >>> get_format("bnb.nf4").bits
        4
    """
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        near = difflib.get_close_matches(str(name), list(FORMATS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise MpsError(f"unknown format {name!r}{hint}; valid: {', '.join(FORMATS)}") from None


def available_formats(device: str | torch.device = "cpu") -> list[str]:
    """Names of the formats that can run on ``device`` here (libraries and GPU checked).

    Example:
        >>> "torch.int8dyn" in available_formats("cpu")
        True
    """
    out = []
    for name, fmt in FORMATS.items():
        try:
            fmt.check_device(device)
        except MpsError:
            continue
        out.append(name)
    return out


# -- exact byte counting ---------------------------------------------------------------------
#: Backends register functions that yield tensors a module keeps outside its parameters and
#: buffers (keyed by module class; subclasses match).
TensorWalker = Callable[[nn.Module], Iterable[torch.Tensor]]
_HIDDEN_TENSORS: dict[type, TensorWalker] = {}


def register_hidden_tensors(cls: type, walker: TensorWalker) -> None:
    """Teach :func:`module_bytes` about tensors ``cls`` keeps outside params and buffers."""
    _HIDDEN_TENSORS[cls] = walker


def _leaves(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """Plain tensors inside ``t`` (tensor subclasses such as torchao's are flattened)."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for n in names:
            inner = getattr(t, n)
            if inner is not None:
                yield from _leaves(inner)
    else:
        yield t


def _own_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    for t in module.parameters(recurse=False):
        yield t
    for t in module.buffers(recurse=False):
        yield t
    for cls, walker in _HIDDEN_TENSORS.items():
        if isinstance(module, cls):
            yield from walker(module)


def _storage_key(t: torch.Tensor) -> tuple[int, int, str] | None:
    if t.device.type == "meta":
        return None
    try:
        s = t.untyped_storage()
        return (s.data_ptr(), s.nbytes(), str(t.device))
    except (RuntimeError, NotImplementedError):  # quantized or otherwise opaque: its own storage
        return (id(t), t.numel() * t.element_size(), str(t.device))


def tensor_storages(modules: Iterable[nn.Module], keep: list[torch.Tensor] | None = None
                    ) -> dict[tuple[int, int, str], int]:
    """Distinct storages (key -> bytes) of every tensor the given modules keep (no recursion).

    Some backends hand out freshly unpacked tensors (torch dynamic int8's packed weight): their
    addresses and ids can be reused once they are freed, so every tensor seen is appended to
    ``keep`` (a local list when None) and stays alive while keys are compared.
    """
    keep = [] if keep is None else keep
    out: dict[tuple[int, int, str], int] = {}
    for m in modules:
        for t in _own_tensors(m):
            for leaf in _leaves(t):
                key = _storage_key(leaf)
                if key is not None:
                    keep.append(leaf)
                    out[key] = key[1]
    return out


def module_bytes(module: nn.Module) -> int:
    """Exact bytes of every distinct tensor ``module`` and its children keep.

    Parameters, buffers and backend-hidden tensors (bitsandbytes quant states, dynamic
    quantized packed params, torchao subclass internals); shared storages counted once.

    Example:
        >>> import torch
        >>> module_bytes(torch.nn.Linear(10, 3))     # (30 + 3) fp32 values
        132
    """
    return sum(tensor_storages(module.modules()).values())


@dataclass
class _Counter:
    """Distinct-storage accumulator (used by :func:`policy_memory_bytes`)."""

    seen: dict[tuple[int, int, str], int] = field(default_factory=dict)
    keep: list[torch.Tensor] = field(default_factory=list)  # tensors alive while keys are compared

    def add(self, storages: dict[tuple[int, int, str], int]) -> int:
        new = {k: v for k, v in storages.items() if k not in self.seen}
        self.seen.update(new)
        return sum(new.values())
