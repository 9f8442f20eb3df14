"""Prompts as MMMU's official code builds them, rendered through the model's own chat template.

The official prompt (MMMU-Benchmark/MMMU, ``construct_prompt`` with the llava1.5 config):

* multiple choice: ``"{question}\\n{options}\\nAnswer with the option's letter from the given
  choices directly."`` where ``options`` is one ``"(A) text\\n"`` line per option, lettered from A
  in list order;
* open: ``"{question}\\nAnswer the question using a single word or phrase."``.

Departure from the official code, documented: the official LLaVA runner keeps the literal
``<image 1>`` text and puts the single image first. Here each ``<image N>`` placeholder becomes an
image slot of the chat message at that position (``placement="inline"``), or all images go first
and the placeholders stay as text (``placement="first"``, what the official runner does, and
what single-image models need).

Example:
    >>> s = {"question": "<image 1> Which colour?", "options": "['red', 'blue']",
    ...      "question_type": "multiple-choice"}
    >>> print(mmmu_prompt(s))
    <image 1> Which colour?
    (A) red
    (B) blue
    <BLANKLINE>
    Answer with the option's letter from the given choices directly.
"""
from __future__ import annotations

import ast
import re
from typing import Any, Mapping, Sequence

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
_PLACEHOLDER = re.compile(r"<image (\d+)>")


def parse_options(options: Any) -> list[str]:
    """The options field: a string holding a Python list, read with ``ast.literal_eval``."""
    if isinstance(options, (list, tuple)):
        return [str(o) for o in options]
    if options is None or options == "":
        return []
    value = ast.literal_eval(str(options))
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"options must hold a list, found {type(value).__name__}")
    return [str(o) for o in value]


def option_letters(n: int) -> list[str]:
    """``['A', 'B', ...]`` for ``n`` options."""
    return [chr(ord("A") + i) for i in range(n)]


def mmmu_prompt(sample: Mapping[str, Any]) -> str:
    """The official MMMU prompt text of one sample (placeholders left in place)."""
    question = str(sample["question"])
    if sample.get("question_type", "multiple-choice") == "multiple-choice":
        opts = parse_options(sample.get("options"))
        example = "".join(f"({letter}) {opt}\n" for letter, opt in zip(option_letters(len(opts)), opts))
        return f"{question}\n{example}\n{MC_INSTRUCTION}"
    return f"{question}\n{OPEN_INSTRUCTION}"


def sample_images(sample: Mapping[str, Any]) -> dict[int, Any]:
    """``{N: image}`` for the ``image_N`` fields that are set (N = 1..7)."""
    return {i: sample[f"image_{i}"] for i in range(1, 8) if sample.get(f"image_{i}") is not None}


def to_messages(sample: Mapping[str, Any], placement: str = "inline") -> tuple[list[dict[str, Any]], list[Any]]:
    """Chat messages (one user turn) and the images in the order the message uses them.

    ``placement="inline"``: each ``<image N>`` in the prompt becomes an image item at that
    position; ``"first"``: all referenced images first, the prompt text unchanged after them.
    Images are taken in order of first reference; images never referenced are appended
    (inline) or included (first) so that no image is silently dropped.
    """
    text = mmmu_prompt(sample)
    images = sample_images(sample)
    order = []
    for m in _PLACEHOLDER.finditer(text):
        n = int(m.group(1))
        if n in images and n not in order:
            order.append(n)
    order += [n for n in sorted(images) if n not in order]
    if placement == "first":
        content: list[dict[str, Any]] = [{"type": "image"} for _ in order]
        content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}], [images[n] for n in order]
    if placement != "inline":
        raise ValueError(f"placement must be 'inline' or 'first', got {placement!r}")
    content = []
    used: list[int] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        n = int(m.group(1))
        if n not in images or n in used:
            continue
        before = text[pos:m.start()]
        if before.strip():
            content.append({"type": "text", "text": before.strip(" ")})
        content.append({"type": "image"})
        used.append(n)
        pos = m.end()
    rest = text[pos:]
    unreferenced = [n for n in order if n not in used]
    content = [{"type": "image"} for _ in unreferenced] + content
    if rest.strip():
        content.append({"type": "text", "text": rest.strip(" ")})
    return [{"role": "user", "content": content}], [images[n] for n in unreferenced + used]


def render_prompt(processor: Any, sample: Mapping[str, Any], placement: str = "inline") -> tuple[str, list[Any]]:
    """The prompt rendered by the processor's chat template (generation prompt added) and its images."""
    messages, images = to_messages(sample, placement)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, images


def encode_batch(
    processor: Any,
    samples: Sequence[Mapping[str, Any]],
    answers: Sequence[str] | None = None,
    placement: str = "inline",
    padding_side: str = "right",
) -> dict[str, Any]:
    """Tokenize a batch through the model's processor and chat template.

    Returns the processor's tensors plus ``prompt_last`` (LongTensor: index of each row's last
    prompt token, whose next-token logits answer the question) and, when ``answers`` are given,
    ``labels`` where only the answer tokens count (everything else is -100).

    Example:
        >>> batch = encode_batch(processor, rows[:4], answers=[r["answer"] for r in rows[:4]])  # doctest: +SKIP
        >>> model(**{k: v for k, v in batch.items() if k != "prompt_last"}).loss  # doctest: +SKIP
    """
    import torch

    tok = getattr(processor, "tokenizer", processor)
    prompts: list[str] = []
    images: list[Any] = []
    for s in samples:
        text, imgs = render_prompt(processor, s, placement)
        prompts.append(text)
        images.extend(imgs)
    # Length of each rendered prompt in tokens, with image tokens expanded by the processor. Without
    # answers the whole row is the prompt, so the batch's attention mask gives it (no second pass).
    prompt_lens: list[int] | None = None
    if answers is not None:
        prompt_lens = []
        for s, p in zip(samples, prompts):
            imgs = to_messages(s, placement)[1]
            enc = processor(text=[p], images=imgs or None, return_tensors="pt")
            prompt_lens.append(int(enc["input_ids"].shape[1]))
    full = prompts if answers is None else [p + str(a) + (tok.eos_token or "") for p, a in zip(prompts, answers)]
    old_side = tok.padding_side
    tok.padding_side = padding_side
    try:
        enc = processor(text=full, images=images or None, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old_side
    out = dict(enc)
    mask = out["attention_mask"]
    seq_len = mask.shape[1]
    lengths = mask.sum(dim=1)
    pad_left = (seq_len - lengths) if padding_side == "left" else torch.zeros_like(lengths)
    lens = [int(n) for n in lengths] if prompt_lens is None else prompt_lens
    out["prompt_last"] = torch.tensor([int(pl) + n - 1 for pl, n in zip(pad_left, lens)], dtype=torch.long)
    if answers is not None:
        assert prompt_lens is not None
        labels = out["input_ids"].clone()
        for i, (pl, n, length) in enumerate(zip(pad_left, prompt_lens, lengths)):
            labels[i, : int(pl) + n] = -100
            labels[i, int(pl) + int(length):] = -100
        labels[mask == 0] = -100
        out["labels"] = labels
    return out
