"""Write a policy as a compressed-tensors checkpoint (transformers loads it, vLLM serves it).

compressed-tensors is llm-compressor's checkpoint format: ``config.json`` carries a
``quantization_config`` with ``quant_method: compressed-tensors``, ``config_groups`` (one
:class:`~compressed_tensors.quantization.QuantizationScheme` each, with ``targets``), an
``ignore`` list and a storage ``format``; the safetensors hold, per quantized Linear,
``weight_packed`` (int4/int8 codes packed into int32, "pack-quantized") or an int8
``weight`` ("int-quantized"), ``weight_scale``, ``weight_shape`` and, for asymmetric
schemes, ``weight_zero_point``. mpsearch never hand-writes that layout: codes are packed with
compressed-tensors' own ``pack_to_int32`` and every layer is decompressed again with the
library's compressor class and compared, bit for bit, with the weight mpsearch ran with.

**Exactness.** The checkpoint holds mpsearch's own codes and scales (no second quantization
that could round differently). Only formats whose numerics compressed-tensors holds exactly
export (:data:`CT_SCHEMES`):

| mpsearch format | compressed-tensors scheme | storage format |
|---|---|---|
| ``rtn.int8ch`` | int8 symmetric, per channel, weight-only (W8A16) | pack-quantized |
| ``rtn.int4g128`` | int4 symmetric, group 128, weight-only (W4A16) | pack-quantized |
| ``torch.int8dyn`` | int8 symmetric per channel + dynamic int8 activations per token (W8A8) | int-quantized |
| ``torch.int8wo`` | int8 symmetric, per channel, weight-only (W8A16), once ``formats/torch_wo.py`` registers it (its extractor is unverified until then: the bit-for-bit check refuses it if wrong) | pack-quantized |
| ``fp32``/``bf16``/``fp16`` | kept in full precision: listed in ``ignore`` | dense |

Not exportable: ``rtn.int4/int3/int2`` (their zero points are fractional fp16 values;
compressed-tensors and vLLM hold integer zero points only), ``torch.int4wo`` and ``ao.int4wo``
(tinygemm layout: a floating zero added after scaling, ``(q - 8) * s + z``, not
``(q - zp) * s``), ``bnb.*`` (NF4/FP4 code books and LLM.int8 outlier decomposition have no
compressed-tensors scheme), ``ao.int8wo``/``ao.fp8`` (torchao's own tensors; use
:mod:`mpsearch.export.torchao`).

``torch.int8dyn``: its weights are held exactly, but PyTorch quantizes activations per tensor
(uint8, dynamic range); compressed-tensors/vLLM's W8A8 quantizes them per token (int8,
symmetric), a finer grid. Logits of the exported model therefore differ slightly from
mpsearch's for such layers (the tests measure it); the weights do not.

Weights kept in full precision by a cast format (``bf16`` in an fp32 model) are stored rounded
to that format, in the checkpoint's dtype (the model's). Names in ``targets``/``ignore`` are
the module paths transformers gives the loaded model (what mpsearch's maps use); vLLM maps them
to its own with its model's ``hf_to_vllm_mapper``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.models.params import model_dtype

INSTALL = "pip install 'mpsearch[export]'"
FORMAT_NAME = "compressed-tensors"
CAST_FORMATS = ("fp32", "bf16", "fp16")

#: what an extractor returns for one built module: signed codes int8 ``[out, in]``, the scale
#: ``[out, groups]`` (any float dtype) and the integer zero point (None when symmetric)
Extracted = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _ct() -> Any:
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors import quantization  # noqa: F401
    except ImportError as exc:
        raise MpsError(f"exporting compressed-tensors checkpoints needs compressed-tensors: {INSTALL} ({exc})") from None
    return compressed_tensors


# -- per-format extractors -------------------------------------------------------------------
def _sym_rtn(inner: nn.Module) -> Extracted:
    return inner.codes(), inner.scale, None


def _torch_int8dyn(inner: nn.Module) -> Extracted:
    w, _ = inner._packed_params._weight_bias()
    if w.qscheme() not in (torch.per_channel_symmetric, torch.per_channel_affine):
        raise MpsError(f"torch.int8dyn: expected per-channel weights, got {w.qscheme()}")
    zp = w.q_per_channel_zero_points()
    if bool((zp != 0).any()):
        raise MpsError("torch.int8dyn: the weights have non-zero zero points; compressed-tensors W8A8 is symmetric")
    return w.int_repr(), w.q_per_channel_scales().unsqueeze(1), None


def _torch_int8wo(inner: nn.Module) -> Extracted:
    """``torch.int8wo`` (mpsearch/formats/torch_wo.py): int8 ``[out, in]`` codes + per-row scales."""
    codes = getattr(inner, "qweight", None)
    if codes is None:
        codes = getattr(inner, "weight_int8", None)
    scale = getattr(inner, "scales", None)
    if scale is None:
        scale = getattr(inner, "scale", None)
    if codes is None or scale is None or codes.dtype != torch.int8:
        raise MpsError(f"torch.int8wo: cannot read the int8 codes and scales of {type(inner).__name__}")
    return codes, scale.reshape(codes.shape[0], 1), None


@dataclass(frozen=True)
class CTScheme:
    """How one mpsearch format is written as a compressed-tensors scheme.

    Example:
        >>> CT_SCHEMES["rtn.int4g128"].key
        'W4A16-sym-group128'
    """

    key: str
    weights: dict[str, Any]
    storage: str
    extract: Callable[[nn.Module], Extracted]
    input_activations: dict[str, Any] | None = None

    def scheme(self, targets: list[str]) -> Any:
        """The compressed-tensors ``QuantizationScheme`` for these targets."""
        _ct()
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        acts = QuantizationArgs(**self.input_activations) if self.input_activations else None
        return QuantizationScheme(targets=targets, weights=QuantizationArgs(**self.weights),
                                  input_activations=acts, format=self.storage)


_W8_CHANNEL = dict(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False)
CT_SCHEMES: dict[str, CTScheme] = {
    "rtn.int8ch": CTScheme("W8A16-sym-channel", _W8_CHANNEL, "pack-quantized", _sym_rtn),
    "rtn.int4g128": CTScheme("W4A16-sym-group128", dict(num_bits=4, type="int", symmetric=True, strategy="group",
                                                        group_size=128, dynamic=False), "pack-quantized", _sym_rtn),
    "torch.int8dyn": CTScheme("W8A8-int8-channel-token-dynamic", _W8_CHANNEL, "int-quantized", _torch_int8dyn,
                              dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)),
    "torch.int8wo": CTScheme("W8A16-sym-channel", _W8_CHANNEL, "pack-quantized", _torch_int8wo),
}


def exportable_formats_ct() -> list[str]:
    """The registered formats a compressed-tensors checkpoint holds (casts included), in registry order."""
    from mpsearch.formats import FORMATS

    return [n for n in FORMATS if n in CAST_FORMATS or n in CT_SCHEMES]


# -- checks ------------------------------------------------------------------------------------
@dataclass
class _Plan:
    layers: list[Any]                       # mpsearch.models.Layer
    formats: dict[str, str]                 # layer -> format
    groups: dict[str, list[str]] = field(default_factory=dict)  # scheme key -> layer names
    ignore: list[str] = field(default_factory=list)


def _scheme_key(fmt: str) -> str:
    return "dense" if fmt in CAST_FORMATS else CT_SCHEMES[fmt].key


def plan_export(model: nn.Module, policy: Any, space: Any = None, exportable: Sequence[str] | None = None,
                what: str = FORMAT_NAME) -> _Plan:
    """Resolve ``policy`` over the model's layers and check it exports (nothing is written).

    Raises :class:`MpsError` in one line naming the first layer whose format does not export
    (with the exportable formats), or the first tie group (q/k/v, gate/up) whose members would
    get different schemes. Tie groups come from ``space`` (its ``tie`` field) when given, else
    from :func:`mpsearch.models.discover_layers` (the natural q/k/v and gate/up sets vLLM fuses).
    """
    from mpsearch.models import discover_layers

    layers = discover_layers(model)
    names = [l.name for l in layers]
    resolved = policy.resolve(names)
    ok = list(exportable) if exportable is not None else exportable_formats_ct()
    for name in names:
        fmt = resolved.formats[name]
        if fmt not in ok:
            raise MpsError(f"layer {name!r} has format {fmt!r}, which {what} cannot hold exactly; "
                           f"exportable formats: {', '.join(ok)}")
    plan = _Plan(layers, dict(resolved.formats))
    for layer in layers:
        if layer.weight_tied_to and plan.formats[layer.name] not in CAST_FORMATS:
            raise MpsError(f"layer {layer.name!r} shares its weight with {layer.weight_tied_to!r} (tied embeddings) "
                           f"and has format {plan.formats[layer.name]!r}: keep it in full precision to export")
    _check_ties(layers, plan.formats, space, key=_scheme_key if what == FORMAT_NAME else (lambda f: f))
    from mpsearch.formats import QuantizedLinear, get_format
    from mpsearch.models import get_module

    for name in names:  # shapes, dtypes, devices: every layer can take its format
        m = get_module(model, name)
        if not isinstance(m, QuantizedLinear):
            get_format(plan.formats[name]).validate(m, where=f"layer {name!r}")
    return plan


def tie_groups(layers: Sequence[Any], space: Any = None) -> dict[str, list[str]]:
    """``{tie key: [layer names]}``: the space's ties when given, else the layers' natural ones."""
    if space is not None:
        keys = space._tie_keys(layers)
    else:
        keys = {l.name: l.tie for l in layers if getattr(l, "tie", None)}
    out: dict[str, list[str]] = {}
    for name, key in keys.items():
        out.setdefault(key, []).append(name)
    return {k: v for k, v in out.items() if len(v) > 1}


def _check_ties(layers: Sequence[Any], formats: dict[str, str], space: Any, key: Callable[[str], str]) -> None:
    for group, members in tie_groups(layers, space).items():
        schemes = {key(formats[m]) for m in members}
        if len(schemes) > 1:
            detail = ", ".join(f"{m.rpartition('.')[2]}={formats[m]}" for m in members)
            raise MpsError(f"tie group {group!r} mixes schemes ({detail}); serving engines fuse these layers "
                           f"and need one scheme for the whole group: give its members one format")


# -- building the tensors ------------------------------------------------------------------
def _layer_module(model: nn.Module, name: str, fmt: str) -> nn.Module:
    """The backend module ``name`` runs (or would run) in ``fmt``: the swapped-in one, else built."""
    from mpsearch.formats import QuantizedLinear, get_format
    from mpsearch.models import get_module

    m = get_module(model, name)
    if isinstance(m, QuantizedLinear):
        if m._mps_format != fmt:
            raise MpsError(f"layer {name!r} runs in {m._mps_format!r} in this model but the policy says {fmt!r}; "
                           f"export the policy the model was quantized with, or an unquantized model")
        return m.inner
    if fmt in CAST_FORMATS and m.weight.dtype == get_format(fmt).dtype:
        return m
    return get_format(fmt).make_module(m).inner


def _compress_layer(name: str, fmt: str, inner: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors for one layer (local names), verified by decompressing them."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from mpsearch.formats import get_format

    spec = CT_SCHEMES[fmt]
    scheme = spec.scheme([name])
    codes, scale, zero = spec.extract(inner)
    ran_with = get_format(fmt).dequantized(inner).float()  # the weight mpsearch ran with
    scale_ck = scale.to(dtype)
    if not torch.equal(scale_ck.double(), scale.double()):
        raise MpsError(f"layer {name!r} ({fmt}): its scales do not fit the checkpoint dtype "
                       f"{str(dtype).replace('torch.', '')} exactly; export the model in the dtype it ran in")
    out: dict[str, torch.Tensor] = {"weight_scale": scale_ck.contiguous()}
    if spec.storage == "pack-quantized":
        out["weight_packed"] = pack_to_int32(codes.to(torch.int8), spec.weights["num_bits"]).contiguous()
        out["weight_shape"] = torch.tensor(list(codes.shape))
    else:
        out["weight"] = codes.to(torch.int8).contiguous()
    if zero is not None:
        out["weight_zero_point"] = zero.contiguous()
    compressor = BaseCompressor.get_value_from_registry(spec.storage)
    back = compressor.decompress(dict(out), scheme)["weight"]
    if back.shape != ran_with.shape or not torch.equal(back.to(dtype).float(), ran_with):
        diff = (back.float() - ran_with).abs().max().item() if back.shape == ran_with.shape else float("nan")
        raise MpsError(f"layer {name!r} ({fmt}): compressed-tensors does not decompress to the weight mpsearch "
                       f"ran with (max difference {diff:.3g}); refusing an inexact export")
    bias = getattr(inner, "bias", None)
    bias = bias() if callable(bias) else bias
    if bias is not None:
        out["bias"] = bias.detach().to(dtype).contiguous()
    return out


def _dense_layer(inner: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {"weight": inner.weight.detach().to(dtype).contiguous()}
    if inner.bias is not None:
        out["bias"] = inner.bias.detach().to(dtype).contiguous()
    return out


def _base_state_dict(model: nn.Module, layer_names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the model that is not inside one of the layers."""
    prefixes = tuple(n + "." for n in layer_names)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def quantization_config(plan: _Plan) -> Any:
    """The compressed-tensors ``QuantizationConfig`` of a checked plan (one group per scheme)."""
    _ct()
    from compressed_tensors.quantization import QuantizationConfig

    by_key: dict[str, tuple[CTScheme, list[str]]] = {}
    ignore: list[str] = []
    for layer in plan.layers:
        fmt = plan.formats[layer.name]
        if fmt in CAST_FORMATS:
            ignore.append(layer.name)
            continue
        spec = CT_SCHEMES[fmt]
        by_key.setdefault(spec.key, (spec, []))[1].append(layer.name)
    groups = {f"group_{i}": spec.scheme(targets) for i, (spec, targets) in enumerate(by_key.values())}
    storages = sorted({spec.storage for spec, _ in by_key.values()})
    fmt = storages[0] if len(storages) == 1 else "mixed-precision"
    return QuantizationConfig(config_groups=groups, format=fmt, quantization_status="compressed", ignore=ignore)


def write_checkpoint(model: nn.Module, policy: Any, out_dir: str | Path, processor: Any = None,
                     space: Any = None, overwrite: bool = False) -> Path:
    """The work behind :func:`mpsearch.export.export_checkpoint` for ``compressed-tensors``."""
    _ct()
    from compressed_tensors.compressors import ModelCompressor

    plan = plan_export(model, policy, space)
    if not any(f not in CAST_FORMATS for f in plan.formats.values()):
        raise MpsError("the policy keeps every layer in full precision: there is nothing to export as "
                       "compressed-tensors (save the model with save_pretrained instead)")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise MpsError(f"{out} exists and is not an empty directory; choose another -o or pass overwrite=True")
    dtype = model_dtype(model)
    # every module is built (and checked) before anything is written
    tensors = _base_state_dict(model, plan.formats)
    for layer in plan.layers:
        fmt = plan.formats[layer.name]
        inner = _layer_module(model, layer.name, fmt)
        local = _dense_layer(inner, dtype) if fmt in CAST_FORMATS else _compress_layer(layer.name, fmt, inner, dtype)
        tensors.update({f"{layer.name}.{k}": v for k, v in local.items()})
    qconfig = quantization_config(plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _save(model, tensors, tmp)
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
        _annotate_config(tmp, plan, model)
        if processor is not None:
            try:
                processor.save_pretrained(str(tmp))
            except MpsError:
                raise
            except Exception as exc:  # noqa: BLE001 - one line, not a traceback
                raise MpsError(f"could not save the processor: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save(model: nn.Module, tensors: dict[str, torch.Tensor], out: Path) -> None:
    """config.json, generation config and safetensors through transformers' own save_pretrained."""
    # distinct storages for safetensors (a tied head shares the embedding's tensor)
    seen: set[int] = set()
    for k, v in list(tensors.items()):
        ptr = v.untyped_storage().data_ptr() if v.numel() else id(v)
        if ptr in seen:
            tensors[k] = v.clone()
        seen.add(ptr)
    model.save_pretrained(str(out), state_dict=tensors, safe_serialization=True)


def _annotate_config(out: Path, plan: _Plan, model: nn.Module) -> None:
    """Record what mpsearch exported (formats per scheme) next to the quantization config."""
    path = out / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    counts: dict[str, int] = {}
    for f in plan.formats.values():
        counts[f] = counts.get(f, 0) + 1
    from mpsearch import __version__

    data["mpsearch_export"] = {"mpsearch": __version__, "formats": counts,
                               "schemes": {f: _scheme_key(f) for f in counts}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
