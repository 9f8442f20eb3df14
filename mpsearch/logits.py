"""Next-token logits at the answer position, and the KL between two models' distributions.

The one place both the sensitivity methods (``kl``, refine's objective) and evaluation read a
model's answer distribution and compare it with full precision, so that "KL" means the same
number in a sensitivity report, a refined front and a results table: nats, computed in float64.

Example:
    >>> import torch
    >>> ref = torch.tensor([[2.0, 0.0, -1.0]])
    >>> float(kl_nats(ref, ref))
    0.0
    >>> round(float(kl_nats(ref, torch.tensor([[0.0, 0.0, 0.0]]))), 4)
    0.6018
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch

__all__ = ["last_token_logits", "kl_nats"]


def last_token_logits(model: Any, inputs: Mapping[str, Any], prompt_last: torch.Tensor) -> torch.Tensor:
    """fp32 next-token logits ``[rows, vocab]`` at each row's ``prompt_last`` position.

    ``inputs`` are the model's forward keywords (on its device). Models whose forward takes
    ``logits_to_keep`` (transformers' own classes) compute the head on those positions only,
    not on the whole sequence (a ``[batch, seq, vocab]`` tensor).
    """
    rows = torch.arange(prompt_last.shape[0])
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        keep = torch.unique(prompt_last)  # sorted
        logits = model(**inputs, logits_to_keep=keep.to(inputs["input_ids"].device)).logits
        col = torch.searchsorted(keep, prompt_last)
        return logits[rows.to(logits.device), col.to(logits.device)].float()
    logits = model(**inputs).logits
    return logits[rows.to(logits.device), prompt_last.to(logits.device)].float()


def kl_nats(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || p_other)`` per row, in nats, float64; the inputs are logits or log-probs
    (``[rows, vocab]`` or ``[vocab]``; normalized here, so either gives the same value).

    float64 because the KL of nearby distributions is a small difference of large sums: fp32
    rounding alone gives ``|KL| ~ 1e-7``, even negative values.
    """
    log_p = torch.log_softmax(ref.double(), dim=-1)
    log_q = torch.log_softmax(other.to(ref.device).double(), dim=-1)
    return torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
