"""The ``activation`` method: expected output error of each layer on calibration activations.

For a layer ``y = x W^T`` and a format ``f`` with ``D = W - Q_f(W)``, the output error summed
over the calibration tokens is ``sum_t ||D x_t||^2 = tr(D X^T X D^T)``: it needs only the Gram
matrix ``X^T X`` of the layer's inputs, accumulated in fp32 by forward pre-hooks (the
layer-wise Hessian of GPTQ; NNCF's ``HESSIAN_INPUT_ACTIVATION``). The score is that error per
token: ``tr(D X^T X D^T) / n_tokens``. Forward passes only.

Formats that also quantize activations (``weight_only=False``: ``bnb.int8``, ``torch.int8dyn``)
add an activation error this score does not see; the ``kl`` method measures the whole.

Padding positions are left out where the hook can tell (inputs shaped like the batch's
attention mask); other inputs (vision towers) count every position.

Example:
    >>> grams = input_grams(model, batches, modules)                          # doctest: +SKIP
    >>> activation_score(modules["fc1"].weight, Q, *grams["fc1"])             # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mpsearch.configs import MAX_GRAM_MB  # memory allowed for Gram matrices at once (MiB), profile's default
from mpsearch.sensitivity.calib import model_inputs


@torch.no_grad()
def input_grams(model: nn.Module, batches: Sequence[Mapping[str, Any]], modules: Mapping[str, nn.Module],
                progress: bool = False) -> dict[str, tuple[torch.Tensor, int]]:
    """``{name: (X^T X in fp32 [in, in], n_tokens)}`` over all batches, one forward per batch.

    Example:
        >>> G, n = input_grams(model, batches, {"fc": model.fc})["fc"]   # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    state: dict[str, Any] = {"mask": None}
    grams: dict[str, list[Any]] = {}
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
            x = args[0] if args else (kwargs or {}).get("input")
            mask = state["mask"]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(x.device).bool()]
            x = x.reshape(-1, x.shape[-1]).float()
            entry = grams.get(name)
            if entry is None:
                entry = grams[name] = [torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device), 0]
            entry[0].addmm_(x.T, x)
            entry[1] += x.shape[0]
        return hook

    for name, m in modules.items():
        handles.append(m.register_forward_pre_hook(hook_for(name), with_kwargs=True))
    try:
        for batch in tqdm(batches, desc="activation (forward)", disable=not progress, leave=False):
            inputs = model_inputs(model, batch)
            state["mask"] = inputs.get("attention_mask")
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, m in modules.items():
        if name in grams:
            out[name] = (grams[name][0], int(grams[name][1]))
        else:  # never ran (e.g. a module skipped by the forward)
            n_in = m.weight.shape[1]
            out[name] = (torch.zeros(n_in, n_in, dtype=torch.float32, device=m.weight.device), 0)
    return out


def activation_score(w: torch.Tensor, q: torch.Tensor, gram: torch.Tensor, n_tokens: int) -> float:
    """``tr((W - Q) G (W - Q)^T) / n_tokens`` in fp32 (0 when the layer saw no tokens).

    Example:
        >>> w = torch.eye(2); q = torch.zeros(2, 2); x = torch.tensor([[1.0, 2.0]])
        >>> activation_score(w, q, x.T @ x, 1)     # ||(W - Q) x||^2 = 1 + 4
        5.0
    """
    if n_tokens == 0:
        return 0.0
    d = w.detach().float() - q.to(device=w.device, dtype=torch.float32)
    g = gram.to(d.device)
    return float(((d @ g) * d).sum()) / n_tokens


def layer_chunks(modules: Mapping[str, nn.Module], max_gram_mb: float = MAX_GRAM_MB) -> list[list[str]]:
    """Split layers so each chunk's fp32 Gram matrices fit in ``max_gram_mb`` (one pass per chunk).

    Example:
        >>> mods = {"a": nn.Linear(1024, 8), "b": nn.Linear(1024, 8)}
        >>> layer_chunks(mods, max_gram_mb=4)
        [['a'], ['b']]
    """
    chunks: list[list[str]] = [[]]
    used = 0.0
    for name, m in modules.items():
        mb = m.weight.shape[1] ** 2 * 4 / 2**20
        if chunks[-1] and used + mb > max_gram_mb:
            chunks.append([])
            used = 0.0
        chunks[-1].append(name)
        used += mb
    return [c for c in chunks if c]
