"""Calibration data: benchmark rows through the model's own processor and chat template.

Each batch is :func:`mpsearch.tasks.prompts.encode_batch`'s output: the processor tensors, the
``prompt_last`` index of each row's last prompt token, and ``labels`` on the answer tokens
(the gold answer: the option letter for multiple choice, the answer text for open questions;
where no answer is known, the full-precision model's own greedy answer). The loss every
gradient method uses is :func:`answer_loss`, the language-model cross-entropy of those tokens.

Example:
    >>> from mpsearch.tasks import synthetic
    >>> rows = synthetic.generate("dev", 8, seed=0)                        # doctest: +SKIP
    >>> batches = calibration_batches(model, processor, rows, n_samples=8)  # doctest: +SKIP
    >>> float(answer_loss(model, batches[0]))                              # doctest: +SKIP
"""
from __future__ import annotations

import ast
import random
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.models.params import model_device, model_dtype

#: Keys of a calibration batch that are not model inputs.
NON_INPUTS = ("prompt_last", "labels")
WITHHELD = ("", "?")


def calibration_batches(
    model: nn.Module,
    processor: Any,
    bench: Sequence[Mapping[str, Any]],
    n_samples: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    placement: str = "inline",
    max_new_tokens: int = 16,
    progress: bool = False,
    info: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """``n_samples`` rows of ``bench`` (drawn with ``seed``), encoded in batches of ``batch_size``.

    ``bench`` is a :class:`mpsearch.tasks.Benchmark` or any sequence of MMMU-schema dicts.
    Rows whose answer is withheld (``"?"``, empty) get the model's own greedy answer (up to
    ``max_new_tokens`` tokens) as the target. Tensors stay on the CPU; :func:`model_inputs`
    moves them. ``info``, when given, receives ``answer_source`` (``"gold"``/``"model"`` per
    row, in batch order) and ``answers_from_model`` (their count).

    Example:
        >>> batches = calibration_batches(model, processor, rows, n_samples=4, batch_size=2)  # doctest: +SKIP
        >>> sorted(k for k in batches[0] if k in ("labels", "prompt_last"))                  # doctest: +SKIP
        ['labels', 'prompt_last']
    """
    from mpsearch.tasks.prompts import encode_batch

    if n_samples < 1 or batch_size < 1:
        raise MpsError(f"calibration: n_samples and batch_size must be >= 1, got {n_samples} and {batch_size}")
    rows = select_rows(bench, n_samples, seed)
    answers = [answer_text(r) for r in rows]
    missing = [i for i, a in enumerate(answers) if a is None]
    if missing:
        generated = greedy_answers(model, processor, [rows[i] for i in missing], batch_size=batch_size,
                                   placement=placement, max_new_tokens=max_new_tokens)
        for i, a in zip(missing, generated):
            answers[i] = a
    batches = []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(rows), batch_size), desc="calibration", disable=not progress, leave=False):
        chunk = rows[start:start + batch_size]
        enc = encode_batch(processor, chunk, answers=answers[start:start + batch_size], placement=placement,
                           padding_side="right")
        batches.append(enc)
    if info is not None:
        info["answer_source"] = ["model" if i in set(missing) else "gold" for i in range(len(rows))]
        info["answers_from_model"] = len(missing)
    return batches


def select_rows(bench: Sequence[Mapping[str, Any]], n_samples: int, seed: int) -> list[Mapping[str, Any]]:
    """``n_samples`` distinct rows drawn with ``random.Random(seed)``, in benchmark order (all if fewer)."""
    try:
        n = len(bench)
    except TypeError:
        raise MpsError(f"calibration data must be a benchmark or a list of rows, got {type(bench).__name__}") from None
    if n == 0:
        raise MpsError("calibration data is empty: the benchmark split has no rows")
    idx = list(range(n)) if n_samples >= n else sorted(random.Random(seed).sample(range(n), n_samples))
    rows = [bench[i] for i in idx]
    for i, r in zip(idx, rows):
        if not isinstance(r, Mapping) or "question" not in r:
            raise MpsError(f"calibration row {i}: expected an MMMU-schema dict with 'question', got {type(r).__name__}")
    return rows


def answer_text(row: Mapping[str, Any]) -> str | None:
    """The target text of a row: its answer (first of a list), None when withheld.

    Example:
        >>> answer_text({"answer": "B"}), answer_text({"answer": "['24', '24.0']"}), answer_text({"answer": "?"})
        ('B', '24', None)
    """
    raw = row.get("answer")
    if raw is None:
        return None
    if isinstance(raw, (list, tuple)):
        return str(raw[0]) if raw else None
    text = str(raw).strip()
    if text in WITHHELD:
        return None
    if text.startswith("[") and text.endswith("]"):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(value, (list, tuple)):
            return str(value[0]) if value else None
    return text


@torch.no_grad()
def greedy_answers(model: nn.Module, processor: Any, rows: Sequence[Mapping[str, Any]], batch_size: int = 8,
                   placement: str = "inline", max_new_tokens: int = 16) -> list[str]:
    """The model's own greedy answers (decoded new tokens, special tokens dropped, stripped)."""
    from mpsearch.tasks.prompts import encode_batch

    tok = getattr(processor, "tokenizer", processor)
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        enc = encode_batch(processor, rows[start:start + batch_size], placement=placement, padding_side="left")
        inputs = model_inputs(model, enc)
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = gen[:, inputs["input_ids"].shape[1]:]
        out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return out


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch's model inputs on the model's device; floating tensors (pixels) in its dtype."""
    dev, dt = model_device(model), model_dtype(model)
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if k in NON_INPUTS:
            continue
        if isinstance(v, torch.Tensor):
            v = v.to(dev, dtype=dt) if v.is_floating_point() else v.to(dev)
        out[k] = v
    return out


def answer_loss(model: nn.Module, batch: Mapping[str, Any], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the answer tokens (``labels != -100``), computed in fp32.

    ``reduction``: ``"mean"`` over the batch's answer tokens, ``"sum"``, or ``"row"`` (mean per row).

    Example:
        >>> loss = answer_loss(model, batches[0])   # doctest: +SKIP
    """
    labels = batch.get("labels")
    if labels is None:
        raise MpsError("calibration batch has no 'labels' (answer tokens); build it with calibration_batches")
    logits = model(**model_inputs(model, batch)).logits
    labels = labels.to(logits.device)[:, 1:]
    mask = labels != -100
    if not bool(mask.any()):
        raise MpsError("calibration batch has no answer tokens (every label is -100)")
    sel = logits[:, :-1][mask].float()
    ce = nn.functional.cross_entropy(sel, labels[mask], reduction="none")
    if reduction == "mean":
        return ce.mean()
    if reduction == "sum":
        return ce.sum()
    if reduction == "row":
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[mask]
        sums = torch.zeros(labels.shape[0], device=ce.device, dtype=ce.dtype).index_add(0, rows, ce)
        return sums / mask.sum(dim=1).clamp_min(1)
    raise MpsError(f"answer_loss: reduction {reduction!r} is not known; valid: mean, sum, row")


def n_answer_tokens(batches: Sequence[Mapping[str, Any]]) -> int:
    """Answer tokens (targets of the loss) over all batches."""
    return int(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))


def unreached(model: nn.Module, batch: Mapping[str, Any], modules: Mapping[str, nn.Module]) -> list[str]:
    """Modules whose weight does not reach the loss on ``batch``: found by walking the autograd
    graph of one forward pass (no backward). E.g. LLaVA's last vision layer when features come
    from the penultimate one (``vision_feature_layer=-2``).

    Example:
        >>> unreached(model, batches[0], {l.name: get_module(model, l.name) for l in layers})  # doctest: +SKIP
        ['model.vision_tower.vision_model.encoder.layers.1.mlp.fc2', ...]
    """
    from mpsearch.sensitivity.hessian import _only_these_require_grad

    weights = {id(m.weight): name for name, m in modules.items()}
    with _only_these_require_grad(model, [m.weight for m in modules.values()]):
        loss = answer_loss(model, batch)
        found: set[int] = set()
        seen: set[Any] = set()
        stack = [loss.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            var = getattr(fn, "variable", None)
            if var is not None:
                found.add(id(var))
            stack.extend(f for f, _ in fn.next_functions)
        del loss
    return [name for wid, name in weights.items() if wid not in found]
