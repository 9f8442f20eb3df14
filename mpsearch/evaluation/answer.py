"""The answer pass: prompts in, answers, correctness and next-token distributions out.

Two modes: ``logits`` (the option letter scoring highest at the last prompt position) and
``generate`` (greedy decoding parsed by the official MMMU rules); see :mod:`mpsearch.evaluation`.

Example:
    >>> letter_token_ids(processor, "USER: hi ASSISTANT:", ["A", "B"])  # doctest: +SKIP
    {'A': [39], 'B': [40]}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from mpsearch.errors import MpsError
from mpsearch.models.params import model_device, model_dtype

__all__ = ["letter_token_ids", "run_pass", "Pass", "model_dtype", "model_device"]


# --------------------------------------------------------------------------- tokens and batches
def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def letter_token_ids(processor: Any, prompt_text: str, letters: Sequence[str]) -> dict[str, list[int]]:
    """Token ids that start an answer ``L`` right after the rendered prompt, per letter.

    For each letter the prompt is tokenized alone and followed by ``L`` and by ``" " + L``; the
    first token after the prompt's tokens is kept when it decodes to the letter (a tokenizer
    that writes ``"▁A"`` after ``ASSISTANT:`` yields that token). A letter without such a token
    raises :class:`MpsError`: logits mode cannot score it.

    Example:
        >>> letter_token_ids(processor, "USER: hi ASSISTANT:", ["A", "B"])  # doctest: +SKIP
        {'A': [39], 'B': [40]}
    """
    tok = _tokenizer(processor)
    base = tok(prompt_text, add_special_tokens=False)["input_ids"]
    out: dict[str, list[int]] = {}
    for letter in letters:
        ids: list[int] = []
        for suffix in (letter, " " + letter):
            full = tok(prompt_text + suffix, add_special_tokens=False)["input_ids"]
            if full[: len(base)] != base or len(full) <= len(base):
                continue  # the suffix merged with the prompt's last token
            first = int(full[len(base)])
            if tok.decode([first]).strip() == letter and first not in ids:
                ids.append(first)
        if not ids:
            raise MpsError(f"logits mode: the tokenizer has no token for option letter {letter!r} after the "
                           f"generation prompt; use mode='generate'")
        out[letter] = ids
    return out


def _to_model(batch: Mapping[str, Any], model: Any) -> dict[str, Any]:
    import torch

    dev, dtype = model_device(model), model_dtype(model)
    out = {}
    for k, v in batch.items():
        if k in ("prompt_last", "labels"):
            continue
        if isinstance(v, torch.Tensor):
            v = v.to(dev, dtype=dtype) if v.is_floating_point() else v.to(dev)
        out[k] = v
    return out


@dataclass
class Pass:
    """What one policy's pass over the benchmark produced (per question position)."""

    answers: dict[int, Any] = field(default_factory=dict)
    correct: dict[int, bool] = field(default_factory=dict)
    fallback: dict[int, bool] = field(default_factory=dict)
    logprobs: dict[int, Any] = field(default_factory=dict)  # position -> float32 log-softmax (CPU)
    kl: dict[int, float] = field(default_factory=dict)  # position -> KL(p_reference || p_this)
    responses: dict[int, str] = field(default_factory=dict)


def run_pass(model: Any, processor: Any, bench: Any, positions: Sequence[int], mode: str, batch_size: int,
              max_new_tokens: int, placement: str, fallback: str, letter_ids: Mapping[str, list[int]] | None,
              reference: Pass | None, desc: str, progress: bool = True) -> Pass:
    """Answer the questions at ``positions``. Without ``reference`` the next-token log-probs are
    kept (the full-precision pass); with one, only each question's KL to it is kept."""
    import random

    import torch
    from tqdm.auto import tqdm

    from mpsearch.logits import kl_nats, last_token_logits
    from mpsearch.tasks import mmmu
    from mpsearch.tasks.prompts import encode_batch

    out = Pass()
    rng = random.Random(42)  # the official stream: random.seed(42) at import of eval_utils
    tok = _tokenizer(processor)
    bar = tqdm(total=len(positions), desc=desc, unit="q", leave=False, disable=not progress)
    try:
        for start in range(0, len(positions), batch_size):
            chunk = list(positions[start:start + batch_size])
            samples = [bench[i] for i in chunk]
            side = "left" if mode == "generate" else "right"
            enc = encode_batch(processor, samples, placement=placement, padding_side=side)
            inputs = _to_model(enc, model)
            with torch.inference_mode():
                if mode == "logits":
                    last = last_token_logits(model, inputs, enc["prompt_last"])
                    texts: list[str] | None = None
                else:
                    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
                    # Pure greedy: a shipped generation_config's sampling, beams or repetition
                    # penalty (Qwen2-VL ships 1.05) would change which token comes first.
                    gen = model.generate(**inputs, do_sample=False, num_beams=1, repetition_penalty=1.0,
                                         max_new_tokens=max_new_tokens, output_logits=True,
                                         return_dict_in_generate=True, pad_token_id=pad)
                    last = gen.logits[0].float()
                    new = gen.sequences[:, inputs["input_ids"].shape[1]:]
                    texts = tok.batch_decode(new, skip_special_tokens=True)
            lp = torch.log_softmax(last, dim=-1).cpu()
            for k, i in enumerate(chunk):
                if reference is None:
                    out.logprobs[i] = lp[k]
                else:
                    ref = reference.logprobs[i]
                    out.kl[i] = float(kl_nats(ref, lp[k]))
            for k, i in enumerate(chunk):
                q = bench.question(i)
                if mode == "logits":
                    choices = q.choices
                    scores = [max(float(last[k, t]) for t in letter_ids[c]) for c in choices]  # type: ignore[index]
                    pred = choices[max(range(len(choices)), key=lambda j: (scores[j], -j))]
                    out.answers[i] = pred
                    out.correct[i] = mmmu.eval_multi_choice(q.answer, pred)  # type: ignore[arg-type]
                    out.fallback[i] = False
                else:
                    s = mmmu.score_response(texts[k], q.question_type, q.answer, q.options, fallback, rng)  # type: ignore[index,arg-type]
                    out.responses[i] = texts[k]  # type: ignore[index]
                    out.answers[i] = s.pred if isinstance(s.pred, (str, type(None))) else sorted(map(repr, s.pred))
                    out.correct[i] = s.correct
                    out.fallback[i] = s.fallback
            bar.update(len(chunk))
    finally:
        bar.close()
    return out
