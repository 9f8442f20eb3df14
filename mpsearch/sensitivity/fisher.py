"""The ``fisher`` method: empirical Fisher diagonal times the squared weight perturbation.

``F = (1/N) sum_s g_s * g_s`` (elementwise) with ``g_s`` the gradient of sample ``s``'s answer
loss (one backward per sample), accumulated in fp32; the score of format ``f`` is
``sum(F * (Q_f(W) - W)^2)``: the second-order loss increase under a diagonal Fisher
approximation of the Hessian. Dividing by N keeps reports with different sample counts
comparable.

Example:
    >>> fisher, dead = fisher_diagonal(model, batches, modules)   # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mpsearch.sensitivity.calib import answer_loss


def fisher_diagonal(model: nn.Module, batches: Sequence[Mapping[str, Any]], modules: Mapping[str, nn.Module],
                    progress: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({name: F}, dead)``: the mean of squared gradients over batches (fp32, the weight's
    shape and device) and the layers that got no gradient from any batch.

    Each batch is one sample of the empirical Fisher: build the batches with
    ``batch_size=1`` for the per-sample Fisher (what :func:`mpsearch.profile` does).

    Example:
        >>> F, dead = fisher_diagonal(model, batches, {"fc": model.fc})   # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from mpsearch.sensitivity.hessian import _only_these_require_grad

    names = list(modules)
    weights = [modules[n].weight for n in names]
    acc: dict[str, torch.Tensor] = {}
    reached: set[str] = set()
    with _only_these_require_grad(model, weights):
        for batch in tqdm(batches, desc="fisher (backward per sample)", disable=not progress, leave=False):
            loss = answer_loss(model, batch)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for n, g in zip(names, grads):
                if g is None:
                    continue
                reached.add(n)
                sq = g.detach().float().pow(2)
                if n in acc:
                    acc[n] += sq
                else:
                    acc[n] = sq
            del loss, grads
    out = {}
    for n, w in zip(names, weights):
        out[n] = acc[n] / len(batches) if n in acc else torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    return out, [n for n in names if n not in reached]


def fisher_score(w: torch.Tensor, q: torch.Tensor, fisher: torch.Tensor) -> float:
    """``sum(F * (Q - W)^2)`` in fp32.

    Example:
        >>> fisher_score(torch.ones(1, 2), torch.zeros(1, 2), torch.tensor([[2.0, 3.0]]))
        5.0
    """
    d = q.to(device=w.device, dtype=torch.float32) - w.detach().float()
    return float((fisher.to(d.device) * d * d).sum())
