"""Tiny random VLMs of real transformers classes, for trying the tool and for tests (``tiny:<arch>``).

Each comes with a working offline processor (a character-level tokenizer, images + text);
weights are seeded and the global RNG is left alone.

Example:
    >>> model, processor = build_tiny_vlm("llava")
    >>> type(model).__name__, sorted(TINY_ARCHS)[:2]
    ('LlavaForConditionalGeneration', ['idefics3', 'internvl'])
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.models.source import record_source

__all__ = ["TINY_ARCHS", "build_tiny_vlm"]

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
    record_source(model, f"tiny:{arch}", None, seed=seed)
    return model.eval(), processor
