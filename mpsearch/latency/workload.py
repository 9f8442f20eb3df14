"""What is timed: :class:`Workload`, token counts derived from the model's config, dummy inputs.

A workload is the shape of one request: ``batch`` rows, one image of ``image_size`` pixels per
row, ``prompt_tokens`` text tokens, and the phase that is timed:

* ``prefill``: time to first token (vision encoder, projector, the language model over the
  whole prompt with the image's tokens, the head on the last position);
* ``decode``: one generation step with a KV cache holding the prompt (the language model and
  the head see ``batch`` tokens; the vision encoder does not run);
* ``both``: prefill plus ``new_tokens`` decode steps.

Token counts come from the model's own config (vision ``image_size``/``patch_size``, LLaVA's
``vision_feature_select_strategy``, Qwen2-VL's ``spatial_merge_size``, InternVL's
``downsample_ratio``, Idefics3's ``scale_factor``), so dummy inputs can be built without a
processor.

Example:
    >>> w = Workload.parse("batch=2,phase=decode,prompt_tokens=64")
    >>> w.batch, w.phase, w.prompt_tokens
    (2, 'decode', 64)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from mpsearch.errors import MpsError

PHASES = ("prefill", "decode", "both")
STATS = ("median", "min")
CLOCKS = ("wall", "cpu")
#: Text tokens of the prompt when the workload does not say (the image's tokens come on top).
DEFAULT_PROMPT_TOKENS = 32
#: Architectures whose dummy inputs are built from the config alone.
SUPPORTED_ARCHS = ("llava", "qwen2_vl", "qwen2_5_vl", "internvl", "idefics3")


@dataclass(frozen=True)
class Workload:
    """One request shape and how it is timed.

    ``image_size`` / ``prompt_tokens`` default to the vision config's image size and
    :data:`DEFAULT_PROMPT_TOKENS` text tokens. ``threads`` fixes ``torch.set_num_threads`` on
    CPU while timing (restored after; None keeps the current count, which is recorded).
    ``compile`` asks for ``torch.compile`` before timing (True = default mode, or a mode name
    such as ``"reduce-overhead"``, which uses CUDA graphs). ``repeats``/``warmup`` are timed and
    untimed calls; ``stat`` is the statistic tables use (``median``, or ``min`` on a busy CPU).
    ``clock`` is ``wall`` (``perf_counter``; CUDA events on GPU), or ``cpu``: the timing thread's
    CPU time (``time.thread_time``), for single-threaded CPU timing on a shared, loaded machine
    where time spent descheduled would otherwise count (needs ``threads=1``; not on GPU).
    ``inputs`` (a dict of tensors for ``model(**inputs)``) or ``processor`` replace the
    config-derived dummy inputs for architectures that are not in :data:`SUPPORTED_ARCHS`.

    Example:
        >>> Workload(batch=1, phase="prefill", threads=1).to_dict()["threads"]
        1
    """

    batch: int = 1
    image_size: int | None = None
    prompt_tokens: int | None = None
    new_tokens: int = 0
    phase: str = "prefill"
    compile: bool | str = False
    threads: int | None = None
    repeats: int = 30
    warmup: int = 5
    stat: str = "median"
    clock: str = "wall"
    inputs: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    processor: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        from mpsearch.schemas import WorkloadSchema, validate_object

        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("inputs", "processor")}
        validate_object(WorkloadSchema, fields, "workload")

    # -- text form (CLI) ----------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | None) -> "Workload":
        """Parse ``"batch=1,phase=prefill,image_size=336"`` (the CLI's ``--workload``).

        Example:
            >>> Workload.parse("phase=both,new_tokens=16").new_tokens
            16
        """
        if not text:
            return cls()
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("inputs", "processor")]
        kwargs: dict[str, Any] = {}
        for part in text.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise MpsError(f"--workload: {part.strip()!r} is not key=value; keys: {', '.join(names)}")
            key, value = (s.strip() for s in part.split("=", 1))
            if key not in names:
                raise MpsError(f"--workload: unknown key {key!r}; valid: {', '.join(names)}")
            kwargs[key] = _parse_value(key, value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields (``inputs``/``processor`` reduced to a description)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("inputs", "processor")}
        if self.inputs is not None:
            out["inputs"] = describe_inputs(self.inputs)
        if self.processor is not None:
            out["processor"] = type(self.processor).__name__
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Workload":
        """Inverse of :meth:`to_dict` (a described ``inputs`` cannot be rebuilt and is dropped).

        Checked whole (:class:`mpsearch.schemas.WorkloadRecord`): an unknown key or a bad value
        raises :class:`MpsError` naming it.
        """
        from mpsearch.schemas import WorkloadRecord, validate_object

        validate_object(WorkloadRecord, d, "workload")
        names = {f.name for f in dataclasses.fields(cls)} - {"inputs", "processor"}
        return cls(**{k: v for k, v in d.items() if k in names})

    def timing_key(self) -> dict[str, Any]:
        """The fields that change what is measured (cache key; ``repeats``/``warmup`` excluded)."""
        d = self.to_dict()
        d.pop("repeats", None)
        d.pop("warmup", None)
        return d

    def with_(self, **changes: Any) -> "Workload":
        """A copy with some fields changed. Example: ``w.with_(phase="decode")``."""
        return dataclasses.replace(self, **changes)


def _parse_value(key: str, value: str) -> Any:
    if key in ("phase", "stat", "clock"):
        return value
    if key == "compile":
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        return value
    if value.lower() in ("none", "null", ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise MpsError(f"--workload: {key}={value!r} must be an integer") from None


def describe_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Shapes and dtypes of an input dict (for provenance and cache keys)."""
    out: dict[str, Any] = {}
    for k, v in inputs.items():
        shape = getattr(v, "shape", None)
        out[k] = [list(shape), str(getattr(v, "dtype", ""))] if shape is not None else repr(v)[:40]
    return out


# -- token counts ------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenCounts:
    """Tokens each part of the model sees in one timed call of the workload's phase.

    ``vision_seq``: tokens per image inside the vision encoder (CLS included); ``image_tokens``:
    tokens one image takes in the language model's sequence; ``text_tokens``: the prompt's text
    tokens; ``seq_len`` = image + text tokens; ``per_group``: rows x tokens that the Linear layers
    of each group (vision, projector, language, head) see in the timed phase.
    """

    arch: str
    vision_seq: int
    image_tokens: int
    text_tokens: int
    seq_len: int
    per_group: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return dataclasses.asdict(self)


def model_arch(model_or_config: Any) -> str:
    """The ``model_type`` of a model's (or config's) top-level config."""
    config = getattr(model_or_config, "config", model_or_config)
    return str(getattr(config, "model_type", "") or "")


def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise MpsError(f"config field {what} = {value!r}: expected one size or (height, width)")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _image_size(vision: Any, workload: Workload, arch: str) -> tuple[int, int]:
    if workload.image_size is not None:
        return workload.image_size, workload.image_size
    size = getattr(vision, "image_size", None)
    if size is None:
        raise MpsError(
            f"{arch}: the vision config has no image_size (dynamic resolution); give the workload an image_size"
        )
    return _pair(size, "vision_config.image_size")


def token_counts(model_or_config: Any, workload: Workload) -> TokenCounts:
    """Token counts of ``workload`` for a model, from its config alone.

    LLaVA: the CLIP/SigLIP encoder sees ``(image_size/patch_size)**2`` patches plus CLS when the
    vision model has one; the language model gets the patches (``"default"`` strategy drops
    CLS, ``"full"`` keeps it). Qwen2-VL/2.5-VL: the image is resized to a multiple of
    ``patch_size*spatial_merge_size``; the encoder sees every patch, the language model one token
    per ``spatial_merge_size**2`` patches. InternVL: patches plus CLS in the encoder, then
    pixel shuffle by ``downsample_ratio``. Idefics3: patches, then ``scale_factor**2`` merge.

    Example:
        >>> tc = token_counts(model, Workload(batch=1, prompt_tokens=33))   # doctest: +SKIP
        >>> tc.per_group["language"]                                        # doctest: +SKIP
        97
    """
    config = getattr(model_or_config, "config", model_or_config)
    arch = model_arch(config)
    vision = getattr(config, "vision_config", None)
    if arch not in SUPPORTED_ARCHS or vision is None:
        raise MpsError(
            f"cannot derive token counts for model type {arch!r} from its config "
            f"(supported: {', '.join(SUPPORTED_ARCHS)}); pass Workload(inputs=...) or Workload(processor=...)"
        )
    h, w = _image_size(vision, workload, arch)
    if arch == "llava":
        ph, pw = _pair(getattr(vision, "patch_size"), "vision_config.patch_size")
        if h % ph or w % pw:
            raise MpsError(f"image_size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
        patches = (h // ph) * (w // pw)
        has_cls = str(getattr(vision, "model_type", "")) not in ("siglip_vision_model", "siglip2_vision_model")
        vision_seq = patches + (1 if has_cls else 0)
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise MpsError(f"llava: vision_feature_select_strategy {strategy!r} unknown; valid: default, full")
        image_tokens = vision_seq - (1 if (strategy == "default" and has_cls) else 0)
        projector_rows = image_tokens
    elif arch in ("qwen2_vl", "qwen2_5_vl"):
        patch = int(vision.patch_size)
        merge = int(getattr(vision, "spatial_merge_size", 2))
        factor = patch * merge
        gh, gw = max(1, round(h / factor)) * merge, max(1, round(w / factor)) * merge
        vision_seq = gh * gw
        image_tokens = vision_seq // (merge * merge)
        projector_rows = image_tokens
    elif arch == "internvl":
        ph, pw = _pair(vision.patch_size, "vision_config.patch_size")
        patches = (h // ph) * (w // pw)
        vision_seq = patches + 1
        ratio = float(getattr(config, "downsample_ratio", 0.5))
        image_tokens = int(round(patches * ratio * ratio))
        projector_rows = image_tokens
    else:  # idefics3
        patch = int(vision.patch_size)
        patches = (h // patch) * (w // patch)
        vision_seq = patches
        scale = int(getattr(config, "scale_factor", 2))
        image_tokens = patches // (scale * scale)
        projector_rows = image_tokens
    text = workload.prompt_tokens if workload.prompt_tokens is not None else DEFAULT_PROMPT_TOKENS
    seq = image_tokens + text
    b = workload.batch
    if workload.phase == "decode":
        per_group = {"vision": 0, "projector": 0, "language": b, "head": b}
    else:  # prefill (and the prefill part of "both")
        per_group = {"vision": b * vision_seq, "projector": b * projector_rows, "language": b * seq, "head": b}
    return TokenCounts(arch, vision_seq, image_tokens, text, seq, per_group)


def image_token_id(config: Any) -> int:
    """The id of the image placeholder token (``image_token_id`` or ``image_token_index``)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise MpsError(f"{model_arch(config)}: the config names no image token id (image_token_id / image_token_index)")


def _text_vocab(config: Any) -> int:
    text = getattr(config, "text_config", config)
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
    if not vocab:
        raise MpsError(f"{model_arch(config)}: the config has no vocab_size")
    return int(vocab)


def dummy_inputs(model: Any, workload: Workload, seed: int = 0) -> dict[str, Any]:
    """Inputs for ``model(**inputs)`` of the prefill: random pixels and text ids, from the config.

    ``workload.inputs`` is returned as is when given; a ``workload.processor`` renders a text
    with one image through the processor. Raises :class:`MpsError` for architectures whose
    inputs cannot be derived.

    Example:
        >>> batch = dummy_inputs(model, Workload(batch=2))                 # doctest: +SKIP
        >>> batch["input_ids"].shape                                       # doctest: +SKIP
        torch.Size([2, 97])
    """
    import torch

    if workload.inputs is not None:
        return dict(workload.inputs)
    if workload.processor is not None:
        return _processor_inputs(model, workload)
    config = model.config
    tc = token_counts(config, workload)
    arch = tc.arch
    param = next(model.parameters())
    device, dtype = param.device, _float_dtype(model)
    gen = torch.Generator().manual_seed(seed)
    b = workload.batch
    vocab = _text_vocab(config)
    img_id = image_token_id(config)
    specials = {img_id}
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "video_token_id", "vision_start_token_id",
                 "vision_end_token_id", "image_start_token_id", "image_end_token_id", "fake_image_token_id",
                 "global_image_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            specials.add(value)
    pool = torch.tensor([i for i in range(min(vocab, 4096)) if i not in specials])
    text = pool[torch.randint(len(pool), (b, tc.text_tokens), generator=gen)]
    image = torch.full((b, tc.image_tokens), img_id, dtype=torch.long)
    input_ids = torch.cat([image, text], dim=1).to(device)
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    vision = config.vision_config
    h, w = _image_size(vision, workload, arch)
    channels = int(getattr(vision, "num_channels", None) or getattr(vision, "in_channels", None) or getattr(vision, "in_chans", 3))
    if arch in ("llava", "internvl"):
        out["pixel_values"] = torch.randn(b, channels, h, w, generator=gen).to(device, dtype)
    elif arch in ("qwen2_vl", "qwen2_5_vl"):
        patch = int(vision.patch_size)
        merge = int(getattr(vision, "spatial_merge_size", 2))
        tp = int(getattr(vision, "temporal_patch_size", 2))
        gh = max(1, round(h / (patch * merge))) * merge
        gw = max(1, round(w / (patch * merge))) * merge
        out["pixel_values"] = torch.randn(b * gh * gw, channels * tp * patch * patch, generator=gen).to(device, dtype)
        out["image_grid_thw"] = torch.tensor([[1, gh, gw]] * b, device=device)
        # M-RoPE needs each position's modality (0 text, 1 image), as the processor returns it.
        out["mm_token_type_ids"] = (input_ids == img_id).long()
    else:  # idefics3
        out["pixel_values"] = torch.randn(b, 1, channels, h, w, generator=gen).to(device, dtype)
        out["pixel_attention_mask"] = torch.ones(b, 1, h, w, dtype=torch.bool, device=device)
    return out


def _float_dtype(model: Any) -> Any:
    import torch

    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _processor_inputs(model: Any, workload: Workload) -> dict[str, Any]:
    """Render one image and a prompt of about ``prompt_tokens`` words through the processor."""
    from PIL import Image

    vision = getattr(getattr(model, "config", None), "vision_config", None)
    size = workload.image_size or getattr(vision, "image_size", None) or 336
    if isinstance(size, (list, tuple)):
        size = int(size[0])
    image = Image.new("RGB", (size, size), color=(120, 80, 40))
    words = " ".join(["word"] * (workload.prompt_tokens or DEFAULT_PROMPT_TOKENS))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words}]}]
    proc = workload.processor
    try:
        text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a processor without a chat template is a user error
        raise MpsError(f"workload processor {type(proc).__name__} cannot render a chat prompt: {exc}") from None
    enc = proc(text=[text] * workload.batch, images=[image] * workload.batch, return_tensors="pt")
    param = next(model.parameters())
    dtype = _float_dtype(model)
    out = {}
    for k, v in enc.items():
        if hasattr(v, "to"):
            v = v.to(param.device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def rows_of(tc: TokenCounts, group: str) -> int:
    """Rows (tokens) the Linear layers of ``group`` see; 0 when the group does not run."""
    if group not in tc.per_group:
        raise MpsError(f"unknown layer group {group!r}; valid: {', '.join(tc.per_group)}")
    return tc.per_group[group]


__all__ = [
    "Workload", "TokenCounts", "token_counts", "dummy_inputs", "image_token_id", "model_arch",
    "describe_inputs", "rows_of", "PHASES", "SUPPORTED_ARCHS", "DEFAULT_PROMPT_TOKENS",
]
