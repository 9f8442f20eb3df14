"""Next-token distributions and their KL divergence to the full-precision model.

:func:`reference_logits` caches the full-precision model's next-token logits at each row's last
prompt token (fp32, CPU); :func:`kl_to_reference` measures the mean ``KL(p_ref || p_model)`` of
the model as it is now (e.g. with some layers swapped for quantized modules) on the same
batches. ``refine`` and ``evaluate`` use both; :func:`kl_scores` is the ``kl`` sensitivity method.

Example:
    >>> ref = reference_logits(model, batches)                 # doctest: +SKIP
    >>> kl_to_reference(model, batches, ref)                   # doctest: +SKIP
    0.0
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.logits import kl_nats, last_token_logits
from mpsearch.sensitivity.calib import model_inputs


@torch.no_grad()
def next_token_logits(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """fp32 logits ``[rows, vocab]`` at each row's ``prompt_last`` (on the model's device)."""
    if "prompt_last" not in batch:
        raise MpsError("batch has no 'prompt_last'; build it with mpsearch.tasks.prompts.encode_batch")
    return last_token_logits(model, model_inputs(model, batch), batch["prompt_last"])


def reference_logits(model: nn.Module, batches: Sequence[Mapping[str, Any]], progress: bool = False) -> list[torch.Tensor]:
    """The model's next-token logits on each batch (fp32, on the CPU): the KL reference.

    Example:
        >>> ref = reference_logits(model, batches)   # doctest: +SKIP
        >>> ref[0].dtype                             # doctest: +SKIP
        torch.float32
    """
    from tqdm.auto import tqdm

    return [next_token_logits(model, b).cpu() for b in tqdm(batches, desc="reference logits", disable=not progress, leave=False)]


def kl_rows(model: nn.Module, batches: Sequence[Mapping[str, Any]], ref: Sequence[torch.Tensor]) -> torch.Tensor:
    """``KL(p_ref || p_model)`` per row (computed in float64, CPU), rows of all batches concatenated."""
    if len(batches) != len(ref):
        raise MpsError(f"kl: {len(batches)} batches but {len(ref)} reference logit tensors")
    out = []
    for batch, r in zip(batches, ref):
        q = next_token_logits(model, batch)
        r = r.to(q.device).float()
        if r.shape != q.shape:
            raise MpsError(f"kl: reference logits have shape {tuple(r.shape)}, the model gives {tuple(q.shape)} (another model or batches?)")
        out.append(kl_nats(r, q).cpu())
    return torch.cat(out)


def kl_to_reference(model: nn.Module, batches: Sequence[Mapping[str, Any]], ref: Sequence[torch.Tensor]) -> float:
    """Mean over rows of ``KL(p_ref || p_model)`` at the next-token position, in nats.

    Example:
        >>> kl_to_reference(model, batches, reference_logits(model, batches))   # doctest: +SKIP
        0.0
    """
    return float(kl_rows(model, batches, ref).mean())


def kl_scores(
    model: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    decisions: Sequence[Any],
    ref: Sequence[torch.Tensor] | None = None,
    progress: bool = False,
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """The ``kl`` method: for each decision (one layer, or one tie group) and each of its
    formats, swap the real quantized modules in, measure :func:`kl_to_reference`, swap back.

    Every layer x format module is built once (``Format.make_module``). A tie group's KL is
    split equally among its layers (the search sums them back). Returns ``(scores,
    decision_kl)`` with ``decision_kl["<decision key>|<format>"]`` the measured KL.

    Example:
        >>> scores, measured = kl_scores(model, batches, space.decisions(layers))   # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from mpsearch.formats import get_format
    from mpsearch.models import get_module, set_module

    if ref is None:
        ref = reference_logits(model, batches, progress=progress)
    scores: dict[str, dict[str, float]] = {n: {} for d in decisions for n in d.layers}
    measured: dict[str, float] = {}
    total = sum(len(d.choices) for d in decisions)
    bar = tqdm(total=total, desc="kl (layer x format)", disable=not progress, leave=False)
    for d in decisions:
        originals = {n: get_module(model, n) for n in d.layers}
        for fmt in d.choices:
            f = get_format(fmt)
            swapped = {n: f.make_module(m) for n, m in originals.items()}
            try:
                for n, m in swapped.items():
                    set_module(model, n, m)
                kl = kl_to_reference(model, batches, ref)
            finally:
                for n, m in originals.items():
                    set_module(model, n, m)
            del swapped
            measured[f"{d.key}|{fmt}"] = kl
            for n in d.layers:  # float64 rounding can leave a KL of ~-1e-17: a score is >= 0
                scores[n][fmt] = max(kl, 0.0) / len(d.layers)
            bar.update(1)
    bar.close()
    return scores, measured
