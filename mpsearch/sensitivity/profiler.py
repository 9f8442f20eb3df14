"""``mps.profile``: one sensitivity score per layer per candidate format, for any of four methods.

=============  ===========================================================  ==========================
method         score of layer ``l`` in format ``f``                         cost
=============  ===========================================================  ==========================
``hessian``    ``t_l / n_l * ||Q_f(W_l) - W_l||^2`` (HAWQ-V2/V3; ``t_l``    probes x one Hessian-vector
               the Hutchinson trace, all layers per probe, or |tr| + 2 SE   product over the data
               where its interval does not exclude 0: scoring_traces)
``fisher``     ``sum(F_l * (Q_f(W_l) - W_l)^2)``, ``F`` the empirical        one backward per sample
               Fisher diagonal
``activation`` ``tr(D X^T X D^T) / n_tokens``, ``D = W_l - Q_f(W_l)``        forward passes only
``kl``         measured ``KL(p_fp || p_quantized)`` of next-token            one forward over the data
               distributions, layer (or tie group) quantized alone          per layer x format
=============  ===========================================================  ==========================

``Q_f(W)`` is :meth:`mpsearch.formats.Format.quantize_weight`: the weight the real kernel uses.
Layers whose weight does not reach the loss get 0 and are listed in ``meta["dead"]``.

Example:
    >>> import mpsearch as mps
    >>> model, processor = mps.load_vlm("tiny:llava")                                  # doctest: +SKIP
    >>> bench = mps.load_benchmark("synthetic", split="dev")                            # doctest: +SKIP
    >>> sens = mps.profile(model, processor, bench, None, "cpu", method="activation")   # doctest: +SKIP
    >>> print(sens.summary_text())                                                      # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.configs import ProfileConfig
from mpsearch.models.source import model_label
from mpsearch.sensitivity.activation import activation_score, input_grams, layer_chunks
from mpsearch.models.params import model_device, model_dtype
from mpsearch.sensitivity.calib import answer_loss, calibration_batches, n_answer_tokens, unreached
from mpsearch.sensitivity.fisher import fisher_diagonal, fisher_score
from mpsearch.sensitivity.hessian import UNCERTAIN_ACTION, hutchinson, scoring_traces
from mpsearch.sensitivity.kl import kl_scores, reference_logits
from mpsearch.sensitivity.report import DEAD_REASON, SensitivityReport

METHODS = ("hessian", "fisher", "activation", "kl")
HVP_CHOICES = ("auto", "hvp", "fd")


def profile(
    model: nn.Module,
    processor: Any,
    bench: Sequence[Mapping[str, Any]] | None,
    layers: Sequence[Any] | None = None,
    space: Any = None,
    *,
    batches: Sequence[Mapping[str, Any]] | None = None,
    config: ProfileConfig | None = None,
    **settings: Any,
) -> SensitivityReport:
    """Score every layer in every candidate format of ``space`` with ``config.method``.

    Settings come from ``config`` (:class:`mpsearch.configs.ProfileConfig`), and keywords
    named like its fields override them (``method="kl"``, ``n_samples=8``, ...).

    Args:
        model, processor: from :func:`mpsearch.load_vlm` (full precision: fp32, bf16 or fp16).
        bench: calibration rows (MMMU schema); ignored when ``batches`` is given.
        layers: :func:`mpsearch.discover_layers` output (None: all of them).
        space: a :class:`mpsearch.SearchSpace`, or a shipped space name / YAML path.
        method: ``hessian``, ``fisher``, ``activation`` or ``kl``.
        n_samples, seed, batch_size, placement: calibration data (fisher uses batches of 1).
        n_probes, tol: Hutchinson probes, and early stop when every relative SE < ``tol``.
        hvp: ``hvp``: exact products by double backward; a transformers model is switched to
            eager attention for the profile (fused SDPA kernels have no double backward) and
            restored after. ``fd``: finite differences of gradients, any attention kernel.
            ``auto``: ``fd`` for fp32 weights (as accurate, about half the cost), ``hvp`` for
            16-bit weights (see :func:`auto_hvp`). ``meta["hvp"]`` says which ran.
        gradient_checkpointing: recompute activations in backward (transformers models).
        check_reach: find layers that do not reach the loss (one forward with autograd) for
            ``activation`` and ``kl``; gradient methods always know.
        max_gram_mb: memory for the activation method's Gram matrices per pass.

    Returns:
        A :class:`SensitivityReport`; ``meta`` holds groups, depths, dead layers and the
        method's details (hessian: ``hvp``, ``n_probes``, ``trace``, ``trace_stderr``).

    Example:
        >>> sens = profile(model, processor, rows, layers, "cpu", method="kl", n_samples=8)  # doctest: +SKIP
    """
    cfg = ProfileConfig.resolve(config, settings, "profile")
    method, n_samples, seed, batch_size, n_probes = cfg.method, cfg.n_samples, cfg.seed, cfg.batch_size, cfg.n_probes
    tol, hvp, eps, gradient_checkpointing = cfg.tol, cfg.hvp, cfg.eps, cfg.gradient_checkpointing
    check_reach, max_gram_mb, placement, model_name, progress = (
        cfg.check_reach, cfg.max_gram_mb, cfg.placement, cfg.model_name, cfg.progress)
    from mpsearch.artifacts import device_name, provenance
    from mpsearch.formats import get_format
    from mpsearch.models import discover_layers, get_module

    if method not in METHODS:
        raise MpsError(f"sensitivity method {method!r} is not known; valid: {', '.join(METHODS)}")
    if hvp not in HVP_CHOICES:
        raise MpsError(f"hvp {hvp!r} is not known; valid: {', '.join(HVP_CHOICES)}")
    space = _space(space)
    layers = list(layers) if layers is not None else discover_layers(model)
    if not layers:
        raise MpsError("profile: no layers to score")
    modules = {l.name: get_module(model, l.name) for l in layers}
    for name, m in modules.items():
        w = getattr(m, "weight", None)
        if not isinstance(m, nn.Linear) or not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise MpsError(f"layer {name}: is {type(m).__name__}, not a full-precision nn.Linear; profile the unquantized model")
    candidates = {l.name: space.candidates(l) for l in layers}
    for fmt in {f for fs in candidates.values() for f in fs}:
        get_format(fmt).check_device(model_device(model))

    start = time.perf_counter()
    calib_info: dict[str, Any] = {}
    if batches is None:
        if bench is None:
            raise MpsError("profile: give calibration data (bench) or batches")
        batches = calibration_batches(model, processor, bench, n_samples=n_samples,
                                      batch_size=1 if method == "fisher" else batch_size, seed=seed,
                                      placement=placement, progress=progress, info=calib_info)
    batches = list(batches)
    if not batches:
        raise MpsError("profile: no calibration batches")
    meta: dict[str, Any] = {
        "model": model_name or model_label(model),
        "search_space": space.name,
        "n_samples": int(sum(int(b["input_ids"].shape[0]) for b in batches)),
        "n_batches": len(batches),
        "n_answer_tokens": n_answer_tokens(batches),
        "answers_from_model": calib_info.get("answers_from_model"),
        "seed": seed,
        "dtype": str(model_dtype(model)).replace("torch.", ""),
        "groups": {l.name: l.group for l in layers},
        "depths": {l.name: getattr(l, "depth", None) for l in layers},
    }
    extra: dict[str, Any] = {}
    with _eval_mode(model, gradient_checkpointing):
        if method == "hessian":
            scores, dead = _hessian(model, batches, modules, candidates, n_probes, seed, tol, hvp, eps, meta, progress)
            extra = {"hvp": meta["hvp"], "n_probes": meta["n_probes"], "tol": tol}
        elif method == "fisher":
            fisher, dead = fisher_diagonal(model, batches, modules, progress=progress)
            scores = _per_format(modules, candidates, lambda n, w, q: fisher_score(w, q, fisher[n]))
            del fisher
        elif method == "activation":
            dead = unreached(model, batches[0], modules) if check_reach else []
            scores = {}
            for chunk in layer_chunks(modules, max_gram_mb):
                sub = {n: modules[n] for n in chunk}
                grams = input_grams(model, batches, sub, progress=progress)
                scores.update(_per_format(sub, candidates, lambda n, w, q: activation_score(w, q, *grams[n])))
                meta.setdefault("n_tokens", {}).update({n: grams[n][1] for n in chunk})
                del grams
            meta["activation_passes"] = len(layer_chunks(modules, max_gram_mb))
        else:
            dead = unreached(model, batches[0], modules) if check_reach else []
            ref = reference_logits(model, batches, progress=progress)
            decisions = space.decisions(layers)
            scores, measured = kl_scores(model, batches, decisions, ref=ref, progress=progress)
            meta["kl_measured"] = measured
            meta["tie_groups"] = {d.key: list(d.layers) for d in decisions if len(d.layers) > 1}
            meta["tie_split"] = "equal"
    for n in dead:
        scores[n] = {f: 0.0 for f in scores.get(n, candidates[n])}
    meta["dead"] = list(dead)
    meta["dead_reason"] = DEAD_REASON
    meta["seconds"] = round(time.perf_counter() - start, 3)
    prov = provenance(model=meta["model"], sensitivity=method, n_samples=meta["n_samples"], seed=seed,
                      search_space=space.name, device=device_name(model_device(model)), **extra)
    return SensitivityReport(scores={l.name: scores[l.name] for l in layers}, method=method, meta=meta, provenance=prov)


# --------------------------------------------------------------------------- methods
def _hessian(model: nn.Module, batches: Sequence[Mapping[str, Any]], modules: Mapping[str, nn.Module],
             candidates: Mapping[str, list[str]], n_probes: int, seed: int, tol: float | None, hvp: str,
             eps: float | None, meta: dict[str, Any], progress: bool) -> tuple[dict[str, dict[str, float]], list[str]]:
    total = max(n_answer_tokens(batches), 1)
    parts = [(lambda b=b: answer_loss(model, b, reduction="sum") / total) for b in batches]
    with _attention_for(model, auto_hvp(modules) if hvp == "auto" else hvp) as (method, attn):
        est = hutchinson(model, parts, modules, n_probes=n_probes, seed=seed, tol=tol, method=method, eps=eps,
                         progress=progress)
    meta.update({"hvp": method, "attn_implementation": attn, "n_probes": est.n_probes, "n_probes_max": n_probes,
                 "tol": tol, "fd_eps": est.eps, "trace": est.mean, "trace_stderr": est.stderr,
                 "hessian_seconds": round(est.seconds, 3)})

    # A trace whose interval contains zero (probe noise, or not at a minimum) is not a free
    # layer: it is scored with what the probes cannot rule out (hessian.scoring_traces) and
    # listed in meta["uncertain_trace"] with what was done; meta["negative_trace"] lists the
    # negative estimates among them.
    used, flagged = scoring_traces(est)
    meta["trace_used"] = used
    meta["uncertain_trace"] = flagged
    meta["uncertain_trace_action"] = UNCERTAIN_ACTION
    meta["negative_trace"] = [n for n, t in est.mean.items() if t < 0 and n not in est.dead]

    def score(name: str, w: torch.Tensor, q: torch.Tensor) -> float:
        if used[name] == 0.0:
            return 0.0
        d = q.to(device=w.device, dtype=torch.float32)
        d.sub_(w.detach().float())
        return used[name] / w.numel() * float(d.square_().sum())

    return _per_format(modules, candidates, score, skip_zero=lambda n: used[n] == 0.0), est.dead


def _per_format(modules: Mapping[str, nn.Module], candidates: Mapping[str, list[str]], fn: Any,
                skip_zero: Any = None) -> dict[str, dict[str, float]]:
    """``fn(name, W, Q_f(W))`` for each layer and candidate format (one quantization each).

    The layer's own precision (``fp32`` for an fp32 weight) scores 0 without quantizing:
    ``Q_f(W) = W`` there, and every method's score is 0 at zero error. ``skip_zero(name)``
    true: the layer scores 0 in every format (no quantization at all).
    """
    from mpsearch.formats import dtype_format, get_format

    out: dict[str, dict[str, float]] = {}
    for name, m in modules.items():
        w = m.weight.detach()
        out[name] = {}
        own = dtype_format(w.dtype, name)
        for fmt in candidates[name]:
            if fmt == own or (skip_zero is not None and skip_zero(name)):
                out[name][fmt] = 0.0
                continue
            q = get_format(fmt).quantize_weight(w)
            out[name][fmt] = float(fn(name, w, q))
            del q
    return out


# --------------------------------------------------------------------------- model state
def _space(space: Any) -> Any:
    from mpsearch.space import SearchSpace

    if space is None:
        raise MpsError("profile needs a search space (the candidate formats per layer), e.g. 'cpu' or 'gpu-bnb'")
    if isinstance(space, SearchSpace):
        return space
    return SearchSpace.from_yaml(space)


@contextlib.contextmanager
def _eval_mode(model: nn.Module, gradient_checkpointing: bool) -> Iterator[None]:
    """Eval mode (deterministic), or for checkpointing: train mode with every dropout off."""
    was_training = model.training
    if not gradient_checkpointing:
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise MpsError(f"gradient_checkpointing: {type(model).__name__} does not support it; run without it")
    cfg = getattr(model, "config", None)
    busy = [f"{k}={v}" for k, v in _dropouts(cfg) if v]
    if busy:
        raise MpsError("gradient_checkpointing needs train mode, where this model's dropout "
                       f"({', '.join(busy)}) would make the profile random; run without it")
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    try:
        yield
    finally:
        model.activation_checkpointing_disable()
        model.train(was_training)


def _dropouts(cfg: Any, prefix: str = "") -> list[tuple[str, float]]:
    if cfg is None:
        return []
    out = []
    for k, v in vars(cfg).items():
        if "dropout" in k and isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((prefix + k, float(v)))
        elif hasattr(v, "to_dict") and hasattr(v, "model_type"):
            out += _dropouts(v, prefix + k + ".")
    return out


def _attn_impls(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "set_attn_implementation"):
        return None
    out: dict[str, Any] = {"": getattr(cfg, "_attn_implementation", None)}
    for key in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, key, None)
        if sub is not None:
            out[key] = getattr(sub, "_attn_implementation", None)
    return out


def auto_hvp(modules: Mapping[str, nn.Module]) -> str:
    """``hvp="auto"``: ``fd`` for fp32/fp64 weights, ``hvp`` for 16-bit weights.

    Measured on tiny:llava (CPU, 4 probes; docs/benchmarks.md "Sensitivity"): in fp32, finite
    differences match the exact product to ~4e-5 relative at two gradients per probe (~2x a
    forward+backward, any attention kernel), while double backward costs ~4x (eager attention
    included). In bf16, finite differences are off by 3-8% per probe and double backward by 0.3%.
    """
    wide = all(m.weight.dtype in (torch.float32, torch.float64) for m in modules.values())
    return "fd" if wide else "hvp"


@contextlib.contextmanager
def _attention_for(model: nn.Module, hvp: str) -> Iterator[tuple[str, str | None]]:
    """Yields ``(hvp method, attention implementation)``; for ``hvp`` a transformers model is
    switched to eager attention for the duration (double backward needs it), and restored."""
    impls = _attn_impls(model)
    if hvp == "fd" or impls is None or all(v in (None, "eager") for v in impls.values()):
        yield hvp, (impls or {}).get("")
        return
    try:
        model.set_attn_implementation("eager")
        switched = all(v in (None, "eager") for v in (_attn_impls(model) or {}).values())
    except (ValueError, ImportError, AttributeError):
        switched = False
    if not switched:
        _restore_attn(model, impls)
        raise MpsError(f"hvp='hvp' needs eager attention, and this model cannot switch to it (it uses {impls}); use hvp='fd'")
    try:
        yield "hvp", "eager"
    finally:
        _restore_attn(model, impls)


def _restore_attn(model: nn.Module, impls: Mapping[str, Any]) -> None:
    try:
        model.set_attn_implementation({k: v for k, v in impls.items() if v is not None})
    except (ValueError, ImportError, AttributeError, TypeError):
        if impls.get(""):
            model.set_attn_implementation(impls[""])
