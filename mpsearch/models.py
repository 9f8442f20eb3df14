"""Loading vision-language models and discovering their linear layers.

Two jobs, both at the head of the pipeline:

* :func:`load_vlm` turns a name into ``(model, processor)``: ``"demo"`` (the model shipped in
  ``mpsearch/demo/``), ``"tiny:<arch>"`` (a tiny random model built from transformers' own config
  class, for trying the tool and for tests), a local directory, or a Hugging Face hub id / cache
  entry. Everything except ``tiny:`` goes through one code path:
  ``AutoModelForImageTextToText`` / ``AutoProcessor`` ``.from_pretrained``.
* :func:`discover_layers` lists every ``nn.Linear`` of a model as a :class:`Layer` placed in one
  of four groups (``vision``, ``projector``, ``language``, ``head``) with its shape, parameter
  count, natural tie group (q/k/v of one attention block, gate/up of one MLP) and block depth.

How layers are placed (one rule, written down so it can be checked): every module path is read
component by component; components named like a model part are *anchors*:

========== =====================================================================
group      anchor names (a module path component)
========== =====================================================================
vision     ``vision_tower``, ``vision_model``, ``visual``, ``vit``, ``vision_encoder``
projector  ``multi_modal_projector``, ``mlp1``, ``connector``, ``merger``,
           ``vision_proj``, ``mm_projector``
language   ``language_model``, ``text_model``, ``llm``; and the root's own ``model``
           child when the model has none of those (InternLM-XComposer2, original LLaVA)
head       the layer's own name is ``lm_head``, or ``output`` (InternLM2) outside any
           numbered block and outside the vision tower / projector
========== =====================================================================

The deepest anchor on the path wins, so Qwen2-VL's ``model.visual.merger`` is the projector
although it sits under ``visual``. These are the attribute names transformers' own classes use
(LLaVA, LLaVA-NeXT, LLaVA-OneVision, InternVL, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM) and those of
the remote-code InternVL2/2.5 chat models and InternLM-XComposer2. A linear layer no anchor
covers is never guessed: :func:`discover_layers` raises :class:`~mpsearch.errors.MpsError`
naming it.

Linear layers owned by ``nn.MultiheadAttention`` (its ``out_proj``; e.g. SigLIP's pooling head)
are not listed: that module reads ``out_proj.weight`` directly, so swapping the submodule would
not change what runs.

Example:
    >>> from mpsearch.models import load_vlm, discover_layers, group_summary
    >>> model, processor = load_vlm("tiny:llava")
    >>> layers = discover_layers(model)
    >>> layers[-1].name, layers[-1].group
    ('lm_head', 'head')
    >>> sorted(group_summary(layers))
    ['head', 'language', 'projector', 'vision']
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from mpsearch.errors import MpsError

__all__ = [
    "GROUPS",
    "DEMO_DIR",
    "TINY_ARCHS",
    "Layer",
    "load_vlm",
    "build_tiny_vlm",
    "model_source",
    "model_info",
    "discover_layers",
    "group_summary",
    "get_module",
    "set_module",
]

GROUPS: tuple[str, ...] = ("vision", "projector", "language", "head")
DEMO_DIR: Path = Path(__file__).resolve().parent / "demo"

# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One linear layer of a model.

    Attributes:
        name: module path, e.g. ``"model.language_model.layers.0.self_attn.q_proj"``.
        group: ``"vision"``, ``"projector"``, ``"language"`` or ``"head"``.
        in_features, out_features: the layer's shape.
        bias: whether the layer has a bias.
        tie: natural tie group key (``"<parent>.qkv"`` for q/k/v of one attention block,
            ``"<parent>.gate_up"`` for gate/up, InternLM2's w1/w3, of one MLP) or ``None``.
            A fused ``qkv``/``wqkv`` layer is already one layer: its tie is ``None``.
        depth: the block index inside its group (from ``layers.N`` / ``layer.N`` /
            ``blocks.N`` in the path); ``None`` for the projector, the head, unnumbered layers.
        weight_tied_to: module path of another module whose parameter *is* this weight
            (e.g. a head tied to the input embeddings), else ``None``. Replacing such a layer
            unties it: the other module keeps the original tensor.

    Example:
        >>> Layer("blocks.0.fc1", "vision", 4, 8, True).params
        40
    """

    name: str
    group: str
    in_features: int
    out_features: int
    bias: bool
    tie: str | None = None
    depth: int | None = None
    weight_tied_to: str | None = None

    @property
    def params(self) -> int:
        """Weight plus bias element count."""
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


_VISION_ANCHORS = frozenset({"vision_tower", "vision_model", "visual", "vit", "vision_encoder"})
_PROJECTOR_ANCHORS = frozenset(
    {"multi_modal_projector", "mlp1", "connector", "merger", "vision_proj", "mm_projector"}
)
_LANGUAGE_ANCHORS = frozenset({"language_model", "text_model", "llm"})
_HEAD_NAMES = frozenset({"lm_head", "output"})
_TIE_PATTERNS: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset({"q_proj", "k_proj", "v_proj"}), "qkv"),
    (frozenset({"query", "key", "value"}), "qkv"),
    (frozenset({"gate_proj", "up_proj"}), "gate_up"),
    (frozenset({"w1", "w3"}), "gate_up"),  # InternLM2: w2(act(w1 x) * w3 x)
)
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|layer|blocks)\.(\d+)(?:\.|$)")

# Module classes (besides nn.Linear and its subclasses) that count as linear layers: the
# formats module registers the classes it swaps in, so a quantized model is rediscovered.
_EXTRA_LINEAR_TYPES: list[type] = []
# Parents whose Linear children cannot be swapped (they read the child's weight directly).
_UNSWAPPABLE_PARENTS: tuple[type, ...] = (nn.MultiheadAttention,)


def _is_linear(module: nn.Module) -> bool:
    """True for the modules :func:`discover_layers` lists: ``nn.Linear`` (and subclasses,
    e.g. bitsandbytes' ``Linear8bitLt``/``Linear4bit``) plus any type in ``_EXTRA_LINEAR_TYPES``.
    Such modules must expose ``in_features``, ``out_features`` and ``bias``."""
    return isinstance(module, nn.Linear) or isinstance(module, tuple(_EXTRA_LINEAR_TYPES))


def _linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, has_bias)`` of a linear-like module (not from the weight
    tensor, which a 4-bit layer stores packed)."""
    bias = getattr(module, "bias", None)
    if callable(bias) and not isinstance(bias, torch.Tensor):  # torch.ao quantized Linear: bias()
        bias = bias()
    return int(module.in_features), int(module.out_features), bias is not None


def _iter_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` for every swappable linear layer, in module order."""
    skip: set[str] = set()
    inside = "\0"  # prefix of the layer last yielded: named_modules() is pre-order, so its
    for name, module in model.named_modules():  # descendants (a swapped wrapper's inner modules) follow it
        if name.startswith(inside):
            continue
        if isinstance(module, _UNSWAPPABLE_PARENTS):
            skip.update(f"{name}.{child}" if name else child for child, _ in module.named_children())
        if name and name not in skip and _is_linear(module):
            inside = name + "."
            yield name, module


def _anchor_group(component: str, index: int, root_model_is_language: bool) -> str | None:
    if component in _VISION_ANCHORS:
        return "vision"
    if component in _PROJECTOR_ANCHORS:
        return "projector"
    if component in _LANGUAGE_ANCHORS or (index == 0 and component == "model" and root_model_is_language):
        return "language"
    return None


def _classify(name: str, root_model_is_language: bool) -> str | None:
    """The group of the linear layer at ``name``, or None if no rule covers it."""
    parts = name.split(".")
    group = None
    for i, part in enumerate(parts[:-1]):
        group = _anchor_group(part, i, root_model_is_language) or group
    last = parts[-1]
    if last == "lm_head":
        return "head"
    if last == "output" and group in (None, "language") and not _BLOCK_RE.search(name):
        return "head"
    return _anchor_group(last, len(parts) - 1, root_model_is_language) or group


def _depth(name: str, group: str) -> int | None:
    if group in ("projector", "head"):
        return None
    match = _BLOCK_RE.search(name)
    return int(match.group(1)) if match else None


def _tie_keys(shapes: dict[str, tuple[int, int, bool]]) -> dict[str, str]:
    """``{layer name: tie key}`` for the q/k/v and gate/up sets that share a parent (2+ members
    present, same input size)."""
    by_parent: dict[str, dict[str, str]] = {}
    for name in shapes:
        parent, _, last = name.rpartition(".")
        by_parent.setdefault(parent, {})[last] = name
    keys: dict[str, str] = {}
    for parent, children in by_parent.items():
        for members, suffix in _TIE_PATTERNS:
            present = [children[m] for m in sorted(members) if m in children]
            if len(present) >= 2 and len({shapes[n][0] for n in present}) == 1:
                keys.update({n: f"{parent}.{suffix}" if parent else suffix for n in present})
    return keys


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): [owning module paths]}`` over all parameters, duplicates kept."""
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname.rpartition(".")[0])
    return owners


def _no_vision_error(model: nn.Module) -> MpsError:
    return MpsError(
        f"no vision tower found in {type(model).__name__}: is this a vision-language model? "
        f"(looked for linear layers under {', '.join(sorted(_VISION_ANCHORS))})"
    )


def _unplaced_error(model: nn.Module, names: Sequence[str]) -> MpsError:
    shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    return MpsError(
        f"cannot place {len(names)} linear layer(s) of {type(model).__name__} into "
        f"vision/projector/language/head: {shown}; known parts are vision "
        f"{sorted(_VISION_ANCHORS)}, projector {sorted(_PROJECTOR_ANCHORS)}, language "
        f"{sorted(_LANGUAGE_ANCHORS)}, head {sorted(_HEAD_NAMES)}"
    )


def discover_layers(model: nn.Module) -> list[Layer]:
    """Every linear layer of a VLM, in module order, placed in vision/projector/language/head.

    Raises :class:`MpsError` if the model has no vision tower, or if some linear layer cannot
    be placed (all such layers are named). See the module docstring for the placement rule.

    Example:
        >>> model, _ = load_vlm("tiny:qwen2_vl")
        >>> [l.name for l in discover_layers(model) if l.group == "projector"]
        ['model.visual.merger.mlp.0', 'model.visual.merger.mlp.2']
    """
    if not isinstance(model, nn.Module):
        raise MpsError(f"discover_layers needs a torch nn.Module, got {type(model).__name__}")
    linears = list(_iter_linears(model))
    module_names = {part for name, _ in model.named_modules() for part in name.split(".")}
    root_model_is_language = not (module_names & _LANGUAGE_ANCHORS)
    groups = {name: _classify(name, root_model_is_language) for name, _ in linears}
    if "vision" not in groups.values():
        raise _no_vision_error(model)
    unplaced = [name for name, group in groups.items() if group is None]
    if unplaced:
        raise _unplaced_error(model, unplaced)
    shapes = {name: _linear_shape(module) for name, module in linears}
    ties = _tie_keys(shapes)
    owners = _weight_owners(model)
    layers = []
    for name, module in linears:
        weight = getattr(module, "weight", None)
        others = [o for o in owners.get(id(weight), []) if o != name] if weight is not None else []
        group = groups[name]
        layers.append(Layer(name, group, *shapes[name], tie=ties.get(name), depth=_depth(name, group),
                            weight_tied_to=others[0] if others else None))
    return layers


def group_summary(layers: Iterable[Layer]) -> dict[str, dict[str, int]]:
    """Layer count and parameter count per group, all four groups in pipeline order.

    Example:
        >>> group_summary([Layer("a", "vision", 2, 3, False)])["vision"]
        {'count': 1, 'params': 6}
    """
    out = {g: {"count": 0, "params": 0} for g in GROUPS}
    for layer in layers:
        if layer.group not in out:
            raise MpsError(f"layer {layer.name}: group {layer.group!r} is not one of {list(GROUPS)}")
        out[layer.group]["count"] += 1
        out[layer.group]["params"] += layer.params
    return out


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted path (numeric parts index ModuleLists); ``""`` is the model.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> get_module(net, "0").out_features
        2
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        parent = name.rpartition(".")[0]
        hint = ""
        try:
            children = [c for c, _ in model.get_submodule(parent).named_children()]
            hint = f"; {parent or type(model).__name__} has {children[:12]}"
        except AttributeError:
            pass
        raise MpsError(f"no module {name!r} in {type(model).__name__}{hint}") from None


def set_module(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Replace the existing submodule at a dotted path; returns the module it replaced.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> old = set_module(net, "0", nn.Identity())
        >>> type(net[0]).__name__, type(old).__name__
        ('Identity', 'Linear')
    """
    if not name:
        raise MpsError("set_module needs a submodule path, got '' (the model itself)")
    if not isinstance(new_module, nn.Module):
        raise MpsError(f"set_module({name!r}): new module must be an nn.Module, got {type(new_module).__name__}")
    old = get_module(model, name)
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, new_module)
    return old


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "auto": "auto",
}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """A torch dtype or ``"auto"`` (the checkpoint's own dtype; float32 for tiny models)."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise MpsError(f"dtype {dtype} is not supported; valid: float32, bfloat16, float16, auto")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise MpsError(f"unknown dtype {dtype!r}; valid: float32, bfloat16, float16, auto (or fp32/bf16/fp16)")
    return _DTYPES[key]


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MpsError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MpsError(f"device {device!r} requested but no CUDA device is available (torch.cuda.is_available() is False); use device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MpsError(f"device {device!r} requested but the MPS backend is not available; use device='cpu'")
    return dev


def _offline() -> bool:
    """HF offline mode, read from the environment now (huggingface_hub reads it only at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _record_source(model: nn.Module, name: str, revision: str | None, **extra: Any) -> None:
    info = {"model": name, "revision": revision}
    info.update(extra)
    object.__setattr__(model, "_mpsearch_source", info)


def model_info(model: nn.Module) -> dict[str, Any]:
    """Where a model came from: ``{"model", "revision", ...}`` as recorded by :func:`load_vlm`
    (``commit`` for hub models, ``seed`` for tiny ones, ``trust_remote_code``).

    Falls back to transformers' own ``config.name_or_path`` when the model was loaded another
    way; raises :class:`MpsError` if neither exists.

    Example:
        >>> model_info(load_vlm("tiny:llava")[0])["model"]
        'tiny:llava'
    """
    info = getattr(model, "_mpsearch_source", None)
    if info is not None:
        return dict(info)
    name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if not name:
        raise MpsError(f"the source of this {type(model).__name__} is unknown: load it with mpsearch.load_vlm")
    return {"model": name, "revision": None}


def model_source(model: nn.Module) -> str:
    """``name_or_path`` of a model loaded by :func:`load_vlm`, with ``@revision`` if one was asked.

    Example:
        >>> model_source(load_vlm("tiny:llava")[0])
        'tiny:llava'
    """
    info = model_info(model)
    return f"{info['model']}@{info['revision']}" if info.get("revision") else str(info["model"])


def load_vlm(
    name_or_path: str,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    *,
    load_processor: bool = True,
) -> tuple[nn.Module, Any]:
    """Load a vision-language model and its processor, in eval mode on ``device``.

    ``name_or_path``:
      * ``"demo"``: the model shipped in ``mpsearch/demo/`` (same code path as a directory);
      * ``"tiny:<arch>"``: a tiny seeded random model, see :data:`TINY_ARCHS`;
      * a local directory saved with ``save_pretrained``;
      * a Hugging Face hub id (downloaded or taken from the cache; ``HF_HUB_OFFLINE=1`` is
        honoured). Models that ship their own code (InternVL2/2.5 chat, InternLM-XComposer2)
        load through ``AutoModel`` only with ``trust_remote_code=True``.

    ``dtype``: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` (= ``None``: the
    checkpoint's dtype; float32 for tiny models) or a torch dtype. ``load_processor=False``
    returns ``(model, None)`` (enough for layer listing and latency). A missing model raises a
    one-line :class:`MpsError` saying where it was looked for.

    Example:
        >>> model, processor = load_vlm("tiny:llava", dtype="float32")
        >>> model.training, model_source(model)
        (False, 'tiny:llava')
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise MpsError(f"model name must be 'demo', 'tiny:<arch>', a directory or a hub id; got {name_or_path!r}")
    name = str(name_or_path).strip()
    torch_dtype = _parse_dtype(dtype)
    dev = _parse_device(device)
    if name.startswith("tiny:"):
        if revision is not None:
            raise MpsError(f"revision={revision!r} given for {name}: revisions apply to hub ids only")
        model, processor = build_tiny_vlm(name.removeprefix("tiny:"))
        if torch_dtype != "auto":
            model = model.to(torch_dtype)
        if not load_processor:
            processor = None
    elif name == "demo":
        if not (DEMO_DIR / "config.json").is_file():
            raise MpsError(
                f"the demo model is missing: {DEMO_DIR} has no config.json (its weights are not "
                f"trained/shipped yet); use 'tiny:llava', a local directory or a hub id instead"
            )
        model, processor = _load_pretrained(str(DEMO_DIR), torch_dtype, trust_remote_code, revision, load_processor)
        _record_source(model, "demo", revision, path=str(DEMO_DIR))
    else:
        model, processor = _load_pretrained(name, torch_dtype, trust_remote_code, revision, load_processor)
    model = model.to(dev).eval()
    return model, processor


def _resolve_local(name: str, revision: str | None) -> str | None:
    """The directory ``name`` points at, None if ``name`` is a hub id; raises for bad paths."""
    path = Path(name).expanduser()
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if path.exists() or looks_like_path:
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise MpsError(
                f"model directory {str(path.resolve())!r} {what}; pass a directory saved with "
                f"save_pretrained (load_vlm('/path/to/dir') / `mpsearch <command> /path/to/dir`), a hub id, "
                f"'demo' or 'tiny:<arch>'"
            )
        if revision is not None:
            raise MpsError(f"revision={revision!r} given for local directory {name!r}: revisions apply to hub ids only")
        if not (path / "config.json").is_file():
            raise MpsError(f"model directory {str(path.resolve())!r} has no config.json: is it a save_pretrained folder?")
        return str(path)
    if not _HUB_ID_RE.match(name):
        raise MpsError(f"{name!r} is neither an existing directory nor a hub id like 'org/name'")
    return None


def _read_config(source: str, revision: str | None, offline: bool) -> dict[str, Any]:
    """config.json of a directory / hub id as a dict; a one-line MpsError if it is not found."""
    from transformers.utils import cached_file

    try:
        path = cached_file(source, "config.json", revision=revision, local_files_only=offline)
    except Exception as exc:  # noqa: BLE001 - every failure here means "not found"
        state = "HF_HUB_OFFLINE=1, so the hub was not asked" if offline else f"the hub could not serve it ({_first_line(exc)})"
        raise MpsError(
            f"model {source!r} not found: no local directory {str(Path(source).resolve())!r}, not in the "
            f"Hugging Face cache {_hub_cache()!r}, and {state}; point at a local copy with "
            f"load_vlm('/path/to/dir') or `mpsearch <command> /path/to/dir`"
        ) from None
    if path is None:
        raise MpsError(f"model {source!r} has no config.json; point at a save_pretrained folder or hub id")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _model_loader(source: str, config: dict[str, Any], trust_remote_code: bool) -> Callable[..., Any]:
    """The transformers Auto class that loads this checkpoint (raises when it cannot)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = config.get("model_type")
    auto_map = config.get("auto_map") or {}
    if model_type in CONFIG_MAPPING and not (trust_remote_code and auto_map):
        if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise MpsError(
                f"{source}: model_type {model_type!r} is not a vision-language model (transformers "
                f"{transformers.__version__} has no image-text-to-text class for it)"
            )
        return transformers.AutoModelForImageTextToText
    if not auto_map:
        raise MpsError(
            f"{source}: model_type {model_type!r} is unknown to transformers {transformers.__version__} "
            f"and the checkpoint ships no code (no auto_map in config.json)"
        )
    if not trust_remote_code:
        raise MpsError(
            f"{source} ships its own modelling code (model_type {model_type!r}); loading it runs that code: "
            f"pass trust_remote_code=True (CLI: --trust-remote-code) if you trust this repository"
        )
    for auto in ("AutoModelForImageTextToText", "AutoModel", "AutoModelForCausalLM"):
        if auto in auto_map:
            return getattr(transformers, auto)
    raise MpsError(f"{source}: its auto_map {sorted(auto_map)} names no AutoModel class mpsearch can load")


def _load_pretrained(
    name: str, torch_dtype: torch.dtype | str, trust_remote_code: bool, revision: str | None, load_processor: bool
) -> tuple[nn.Module, Any]:
    """The single code path for directories, the demo folder and hub ids."""
    offline = _offline()
    source = _resolve_local(name, revision) or name
    config = _read_config(source, revision, offline)
    loader = _model_loader(source, config, trust_remote_code)
    if trust_remote_code and config.get("auto_map"):
        warnings.warn(f"trust_remote_code=True: running the modelling code shipped by {source!r}", stacklevel=3)
    kwargs: dict[str, Any] = {"revision": revision, "local_files_only": offline, "trust_remote_code": trust_remote_code}
    try:
        model = loader.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except MpsError:
        raise
    except Exception as exc:  # noqa: BLE001 - report in one line, not a traceback
        raise MpsError(f"could not load model {source!r} with {loader.__name__}: {_first_line(exc)}") from None
    processor = _load_processor(source, kwargs) if load_processor else None
    _record_source(model, name, revision, commit=getattr(model.config, "_commit_hash", None),
                   trust_remote_code=trust_remote_code)
    return model, processor


def _load_processor(source: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise MpsError(
            f"could not load the processor of {source!r}: {_first_line(exc)}; "
            f"load_vlm(..., load_processor=False) loads the model alone"
        ) from None


# --------------------------------------------------------------------------------------------
# Tiny random models (real transformers classes, random seeded weights, offline processors)
# --------------------------------------------------------------------------------------------

_HIDDEN, _FFN, _HEADS, _KV_HEADS, _BLOCKS = 64, 128, 4, 2, 2
_IMAGE, _PATCH = 28, 14
_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]
_BASE_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
_CHARS = tuple(chr(i) for i in range(32, 127)) + ("\n",)


def _chat_template(image: str) -> str:
    """A minimal ``USER: ... ASSISTANT:`` template; each image item becomes ``image``."""
    return (
        "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + image.replace("\n", "\\n")
        + "\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


def _tiny_tokenizer(named: dict[str, str], extra: Sequence[str] = ()) -> Any:
    """A character-level tokenizer (printable ASCII + newline) with the special tokens a
    processor needs; ``named`` maps tokenizer attributes (``image_token``) to token strings."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([*_BASE_SPECIALS, *named.values(), *extra]))
    vocab = {tok: i for i, tok in enumerate([*specials, *_CHARS])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=dict(named),
    )
    tok.add_special_tokens({"additional_special_tokens": specials[len(_BASE_SPECIALS):]})
    return tok


def _text_config(tok: Any, **extra: Any) -> dict[str, Any]:
    vocab = -(-len(tok) // 64) * 64  # lm_head rows rounded up to a multiple of 64
    return dict(vocab_size=vocab, hidden_size=_HIDDEN, intermediate_size=_FFN, num_hidden_layers=_BLOCKS,
                num_attention_heads=_HEADS, num_key_value_heads=_KV_HEADS, max_position_embeddings=4096,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)


def _vit_config() -> dict[str, Any]:
    return dict(hidden_size=_HIDDEN, intermediate_size=_FFN, num_hidden_layers=_BLOCKS,
                num_attention_heads=_HEADS, image_size=_IMAGE, patch_size=_PATCH)


def _no_video(processor_cls: type) -> type:
    """The processor class, accepting ``video_processor=None``: transformers' video processors
    need torchvision, which tiny models must not require. Images and text work unchanged."""

    class _ImageOnly(processor_cls):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(self, "video_processor", None) is None:
                raise MpsError(
                    f"this tiny {processor_cls.__name__} has no video processor and cannot be saved (transformers "
                    f"would need torchvision to load it back); save the model alone, or use tiny:llava, "
                    f"tiny:llava_next or tiny:idefics3, whose processors round-trip"
                )
            return super().save_pretrained(*args, **kwargs)

    _ImageOnly.__name__ = _ImageOnly.__qualname__ = f"{processor_cls.__name__}ImageOnly"
    return _ImageOnly


def _tiny_llava(T: Any) -> tuple[Any, type, Any]:
    tok = _tiny_tokenizer({"image_token": "<image>"})
    image_processor = T.CLIPImageProcessorPil(size={"shortest_edge": _IMAGE}, crop_size={"height": _IMAGE, "width": _IMAGE})
    processor = T.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=_PATCH,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                 chat_template=_chat_template("<image>"))
    config = T.LlavaConfig(vision_config=T.CLIPVisionConfig(**_vit_config()), text_config=T.LlamaConfig(**_text_config(tok)),
                           image_token_index=tok.image_token_id, image_seq_length=(_IMAGE // _PATCH) ** 2,
                           vision_feature_layer=-1)
    return config, T.LlavaForConditionalGeneration, processor


def _tiny_llava_next(T: Any) -> tuple[Any, type, Any]:
    tok = _tiny_tokenizer({"image_token": "<image>"})
    image_processor = T.LlavaNextImageProcessorPil(size={"shortest_edge": _IMAGE}, crop_size={"height": _IMAGE, "width": _IMAGE},
                                                  image_grid_pinpoints=_PINPOINTS)
    processor = T.LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=_PATCH,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                     chat_template=_chat_template("<image>"))
    config = T.LlavaNextConfig(vision_config=T.CLIPVisionConfig(**_vit_config()), text_config=T.LlamaConfig(**_text_config(tok)),
                               image_token_index=tok.image_token_id, image_grid_pinpoints=_PINPOINTS, vision_feature_layer=-1,
                               image_seq_length=(_IMAGE // _PATCH) ** 2)
    return config, T.LlavaNextForConditionalGeneration, processor


def _tiny_llava_onevision(T: Any) -> tuple[Any, type, Any]:
    tok = _tiny_tokenizer({"image_token": "<image>", "video_token": "<video>"})
    image_processor = T.LlavaOnevisionImageProcessorPil(size={"height": _IMAGE, "width": _IMAGE}, image_grid_pinpoints=_PINPOINTS)
    processor = _no_video(T.LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tok, video_processor=None, num_image_tokens=(_IMAGE // _PATCH) ** 2,
        vision_feature_select_strategy="full", chat_template=_chat_template("<image>"))
    config = T.LlavaOnevisionConfig(
        vision_config=T.SiglipVisionConfig(**_vit_config(), vision_use_head=False), text_config=T.Qwen2Config(**_text_config(tok)),
        image_token_index=tok.image_token_id, video_token_index=tok.video_token_id, image_grid_pinpoints=_PINPOINTS,
        vision_feature_layer=-1)
    return config, T.LlavaOnevisionForConditionalGeneration, processor


def _tiny_internvl(T: Any) -> tuple[Any, type, Any]:
    tok = _tiny_tokenizer({"start_image_token": "<img>", "end_image_token": "</img>",
                           "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    image_processor = T.GotOcr2ImageProcessorPil(size={"height": _IMAGE, "width": _IMAGE}, crop_to_patches=True,
                                                 min_patches=1, max_patches=4)
    seq = (_IMAGE // _PATCH) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5
    processor = _no_video(T.InternVLProcessor)(image_processor=image_processor, tokenizer=tok, video_processor=None,
                                               image_seq_length=seq, chat_template=_chat_template("<IMG_CONTEXT>"))
    vision = T.InternVLVisionConfig(**_vit_config())
    config = T.InternVLConfig(vision_config=vision, text_config=T.Qwen2Config(**_text_config(tok)),
                              image_token_id=tok.context_image_token_id, image_seq_length=seq)
    return config, T.InternVLForConditionalGeneration, processor


def _qwen_parts(T: Any, processor_cls: type) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    tok = _tiny_tokenizer({"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                           "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    image_processor = T.Qwen2VLImageProcessorPil(min_pixels=_IMAGE * _IMAGE, max_pixels=4 * _IMAGE * _IMAGE,
                                                 patch_size=_PATCH, merge_size=2, temporal_patch_size=2)
    processor = _no_video(processor_cls)(image_processor=image_processor, tokenizer=tok, video_processor=None,
                                         chat_template=_chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}  # sums to head_dim / 2
    ids = dict(image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
               vision_start_token_id=tok.vision_start_token_id, vision_end_token_id=tok.vision_end_token_id)
    return tok, processor, _text_config(tok, rope_parameters=rope), ids


def _tiny_qwen2_vl(T: Any) -> tuple[Any, type, Any]:
    _, processor, text, ids = _qwen_parts(T, T.Qwen2VLProcessor)
    vision = dict(depth=_BLOCKS, embed_dim=_HIDDEN, hidden_size=_HIDDEN, num_heads=_HEADS, patch_size=_PATCH, mlp_ratio=2)
    config = T.Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
    return config, T.Qwen2VLForConditionalGeneration, processor


def _tiny_qwen2_5_vl(T: Any) -> tuple[Any, type, Any]:
    _, processor, text, ids = _qwen_parts(T, T.Qwen2_5_VLProcessor)
    vision = dict(depth=_BLOCKS, hidden_size=_HIDDEN, intermediate_size=_FFN, num_heads=_HEADS, patch_size=_PATCH,
                  out_hidden_size=_HIDDEN, window_size=2 * _IMAGE, fullatt_block_indexes=[_BLOCKS - 1])
    config = T.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    return config, T.Qwen2_5_VLForConditionalGeneration, processor


def _tiny_idefics3(T: Any) -> tuple[Any, type, Any]:
    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = _tiny_tokenizer({"image_token": "<image>"}, ["<fake_token_around_image>", "<end_of_utterance>", "<global-img>", *grid])
    image_processor = T.Idefics3ImageProcessorPil(size={"longest_edge": 2 * _IMAGE}, max_image_size={"longest_edge": _IMAGE},
                                                  do_image_splitting=True)
    seq = (_IMAGE // _PATCH) ** 2 // 4  # scale_factor 2
    processor = T.Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=seq,
                                    chat_template=_chat_template("<image>"))
    config = T.Idefics3Config(vision_config=_vit_config(), text_config=T.LlamaConfig(**_text_config(tok)),
                              image_token_id=tok.image_token_id, scale_factor=2)
    return config, T.Idefics3ForConditionalGeneration, processor


#: ``tiny:<arch>`` names; every one comes with a working processor (images + text). The
#: OneVision/InternVL/Qwen2(.5)-VL processors take no videos (transformers' video processors need
#: torchvision) and refuse ``save_pretrained``; the llava, llava_next and idefics3 ones round-trip
#: through ``save_pretrained`` + :func:`load_vlm`. Every tiny *model* does. Idefics3 is SmolVLM's
#: architecture.
TINY_ARCHS: dict[str, Callable[[Any], tuple[Any, type, Any]]] = {
    "llava": _tiny_llava,
    "llava_next": _tiny_llava_next,
    "llava_onevision": _tiny_llava_onevision,
    "internvl": _tiny_internvl,
    "qwen2_vl": _tiny_qwen2_vl,
    "qwen2_5_vl": _tiny_qwen2_5_vl,
    "idefics3": _tiny_idefics3,
}


def build_tiny_vlm(arch: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """A tiny random VLM of a real transformers class (2 blocks per tower, width 64, 28x28
    images, a character-level tokenizer) and its processor, in eval mode on the CPU.

    Weights are drawn under ``torch.manual_seed(seed)`` without touching the global RNG, so the
    same ``(arch, seed)`` always gives the same model.

    Example:
        >>> model, processor = build_tiny_vlm("internvl")
        >>> type(model).__name__
        'InternVLForConditionalGeneration'
    """
    if arch not in TINY_ARCHS:
        raise MpsError(f"unknown tiny architecture {arch!r}; valid: {', '.join('tiny:' + a for a in TINY_ARCHS)}")
    import transformers as T
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # tiny vocabularies trip harmless config sanity warnings
    try:
        config, model_cls, processor = TINY_ARCHS[arch](T)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(config)
    finally:
        hf_logging.set_verbosity(verbosity)
    _record_source(model, f"tiny:{arch}", None, seed=seed)
    return model.eval(), processor
