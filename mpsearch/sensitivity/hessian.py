"""Hutchinson estimates of Hessian traces, all layers from one probe (HAWQ-V2/V3).

For a loss ``L(w)`` and the weights ``W_l`` of a set of linear layers, the trace of each
diagonal Hessian block ``H_ll`` is estimated with Rademacher probes ``v`` (entries +-1) drawn
for ALL layers at once: one Hessian-vector product ``Hv`` of the whole set per probe, then
``v_l . (Hv)_l`` for each layer. Its expectation is ``tr(H_ll)`` (the cross terms
``v_l^T H_lm v_m`` have mean zero), so the cost per probe is one Hessian-vector product,
whatever the number of layers.

Two ways to get ``Hv``:

* ``method="hvp"``: exact, by double backward (``torch.autograd.grad(..., create_graph=True)``
  then the gradient of ``g . v``). PyTorch's fused scaled-dot-product attention kernels have no
  double backward (on CPU: "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
  is not implemented"), so transformers models need ``attn_implementation="eager"``.
* ``method="fd"``: central finite difference of gradients,
  ``Hv ~ (grad(w + e v) - grad(w - e v)) / (2 e)``, one step ``e = eps * rms(all target
  weights)``. Plain backward passes only (two per probe): works with any attention kernel and in
  bf16, where it is approximate (weights and gradients rounded to bf16: ~3% per probe on
  tiny:llava with the default step ``eps=3e-2``, against ~4e-5 in fp32 with ``eps=1e-3``).

Sums of ``v . Hv`` are accumulated in fp32 whatever the model's dtype.

**Scoring with a trace** (:func:`scoring_traces`). The Hessian of a real loss is not positive
semi-definite and a few probes are noisy, so an estimate can be negative or indistinguishable
from zero. Clipping it to 0 (as before) made such a layer *free* to quantize: the ILP gave it
the lowest bits. A layer is scored with its estimate only when the interval
``mean +- z * stderr`` (``z = TRACE_Z = 2``) lies above zero; otherwise with the upper end of
what the probes cannot rule out, ``|mean| + z * stderr`` (``|mean|`` with one probe, where
there is no interval). That is non-negative, costs no extra probe (the profile stays a fixed
number of gradients per probe, flat in the number of layers), is never smaller than the
clipped estimate, and shrinks to the estimate as probes are added (``n_probes``/``tol``).
Alternatives weighed: more probes until every interval excludes zero (unbounded cost on
layers whose trace is near zero; the cost goal is 3 gradients per probe), the Gauss-Newton /
Fisher diagonal (one backward per sample: a different method, ``method="fisher"``).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> x = torch.randn(8, 3)
    >>> tr = hessian_traces(net, lambda: net(x).pow(2).mean(), {"0": net[0], "2": net[2]}, n_probes=8)
    >>> sorted(tr)
    ['0', '2']
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from mpsearch.errors import MpsError

LossFn = Union[Callable[[], torch.Tensor], Sequence[Callable[[], torch.Tensor]]]
METHODS = ("hvp", "fd")
#: Default relative finite-difference step: fp32 weights, then 16-bit weights.
FD_EPS_FP32 = 1e-3
FD_EPS_16BIT = 3e-2
_SDPA_HINT = "scaled_dot_product"


@dataclass
class TraceEstimate:
    """Per-layer Hutchinson estimates.

    ``mean[name]`` estimates ``tr(H_ll)``; ``stderr[name]`` is its standard error over probes
    (NaN with a single probe); ``samples[name]`` the per-probe values ``v_l . (Hv)_l``;
    ``dead`` the layers whose weight gets no gradient (they do not reach the loss: trace 0).
    """

    mean: dict[str, float]
    stderr: dict[str, float]
    n_probes: int
    method: str
    dead: list[str] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)
    eps: float | None = None
    seconds: float = 0.0

    def rel_stderr(self, name: str) -> float:
        """Standard error relative to the estimate (0 when both are 0, inf when only the mean is)."""
        return _rel(self.mean[name], self.stderr[name])


#: Half-width of the interval ``mean +- TRACE_Z * stderr`` that must lie above zero for an
#: estimate to be scored as it is (see :func:`scoring_traces`).
TRACE_Z = 2.0
#: What :func:`scoring_traces` did to a layer whose interval contains zero (or lies below it).
UNCERTAIN_ACTION = "scored with |mean| + 2 SE (the interval mean +- 2 SE does not exclude zero)"


def scoring_traces(est: TraceEstimate, z: float = TRACE_Z) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Non-negative traces to score layers with, and the layers whose interval does not exclude zero.

    A live layer whose interval ``mean +- z * stderr`` lies above zero keeps its mean; any
    other live layer gets ``|mean| + z * stderr`` (``|mean|`` when the standard error is
    unknown: one probe) and is listed with ``{"mean", "stderr", "used"}``. Dead layers (no
    gradient) keep 0. See the module docstring for why.

    Example:
        >>> est = TraceEstimate(mean={"a": 4.0, "b": -0.5}, stderr={"a": 0.5, "b": 1.0}, n_probes=4, method="hvp")
        >>> used, flagged = scoring_traces(est)
        >>> used, sorted(flagged)
        ({'a': 4.0, 'b': 2.5}, ['b'])
    """
    used: dict[str, float] = {}
    flagged: dict[str, dict[str, float]] = {}
    dead = set(est.dead)
    for name, m in est.mean.items():
        se = est.stderr.get(name, math.nan)
        if name in dead:
            used[name] = 0.0
            continue
        if math.isfinite(se) and m - z * se > 0:
            used[name] = float(m)
            continue
        if m > 0 and not math.isfinite(se):  # one probe, positive: nothing says it is wrong
            used[name] = float(m)
            continue
        u = abs(m) + (z * se if math.isfinite(se) else 0.0)
        used[name] = float(u)
        flagged[name] = {"mean": float(m), "stderr": float(se), "used": float(u)}
    return used, flagged


def hessian_traces(
    model: nn.Module,
    loss_fn: LossFn,
    modules: Mapping[str, nn.Module],
    n_probes: int = 16,
    seed: int = 0,
    tol: float | None = None,
    method: str = "hvp",
    eps: float | None = None,
) -> dict[str, float]:
    """Hutchinson estimate of ``tr(d^2 L / dW^2)`` for each named module's weight.

    ``loss_fn()`` returns the scalar loss (it is called once per probe for ``hvp``, twice for
    ``fd``, and must be deterministic: eval mode); a sequence of callables means their sum
    (one batch at a time, so memory holds one batch's graph). ``modules`` maps names to
    modules with a ``weight`` (``nn.Linear``). Layers whose weight gets no gradient get 0.
    ``tol``: stop early once every layer's relative standard error is below it.
    See :func:`hutchinson` for standard errors and probe counts.

    Example:
        >>> net = torch.nn.Linear(1, 1); x = torch.randn(5, 1)   # H = 2 x.x: one probe is exact
        >>> tr = hessian_traces(net, lambda: net(x).pow(2).sum(), {"l": net}, n_probes=2)
        >>> abs(tr["l"] - float(2 * x.pow(2).sum())) < 1e-4
        True
    """
    return dict(hutchinson(model, loss_fn, modules, n_probes=n_probes, seed=seed, tol=tol, method=method, eps=eps).mean)


def hutchinson(
    model: nn.Module,
    loss_fn: LossFn,
    modules: Mapping[str, nn.Module],
    n_probes: int = 16,
    seed: int = 0,
    tol: float | None = None,
    method: str = "hvp",
    eps: float | None = None,
    min_probes: int = 3,
    progress: bool = False,
) -> TraceEstimate:
    """Hutchinson traces with standard errors, early stopping and the per-probe samples.

    Stops after ``n_probes`` probes, or earlier once at least ``min_probes`` were drawn and the
    relative standard error of every live layer is below ``tol``. Probes are Rademacher
    vectors drawn from a generator seeded with ``seed`` on each weight's device.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        >>> x = torch.randn(16, 3)
        >>> est = hutchinson(net, lambda: net(x).pow(2).mean(), {"a": net[0], "b": net[2]}, n_probes=64, tol=0.05)
        >>> est.n_probes <= 64 and est.method
        'hvp'
    """
    if method not in METHODS:
        raise MpsError(f"hessian method {method!r} is not known; valid: {', '.join(METHODS)}")
    if n_probes < 1:
        raise MpsError(f"n_probes must be >= 1, got {n_probes}")
    if not modules:
        raise MpsError("hessian_traces: no modules given")
    names = list(modules)
    weights = []
    for name in names:
        w = getattr(modules[name], "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise MpsError(f"layer {name}: has no floating-point 'weight' (a quantized module?); profile the full-precision model")
        weights.append(w)
    parts = list(loss_fn) if isinstance(loss_fn, (list, tuple)) else [loss_fn]
    if eps is None:
        eps = FD_EPS_FP32 if all(w.dtype == torch.float32 or w.dtype == torch.float64 for w in weights) else FD_EPS_16BIT
    gens: dict[torch.device, torch.Generator] = {}
    samples: dict[str, list[float]] = {n: [] for n in names}
    dead: set[str] | None = None
    start = time.perf_counter()
    bar = _bar(n_probes, f"hessian ({method})", progress)
    k = 0
    with _only_these_require_grad(model, weights):
        for k in range(1, n_probes + 1):
            probes = [_rademacher(w, gens, seed) for w in weights]
            if method == "hvp":
                vals, reached = _probe_hvp(parts, weights, probes)
            else:
                vals, reached = _probe_fd(parts, weights, probes, eps)
            dead = set(n for n, r in zip(names, reached) if not r) if dead is None else dead & {n for n, r in zip(names, reached) if not r}
            for n, v in zip(names, vals):
                samples[n].append(v)
            est = _summarize(samples, k)
            worst = max((_rel(est[0][n], est[1][n]) for n in names if n not in dead), default=0.0)
            bar.update(1)
            bar.set_postfix_str(f"max rel.SE {worst:.3g}")
            if tol is not None and k >= max(2, min_probes) and worst < tol:
                break
    bar.close()
    mean, se = _summarize(samples, k)
    for n in dead or ():
        mean[n], se[n] = 0.0, 0.0
    return TraceEstimate(mean=mean, stderr=se, n_probes=k, method=method, dead=[n for n in names if n in (dead or ())],
                         samples=samples, eps=eps if method == "fd" else None, seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------- internals
def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _rel(mean: float, se: float) -> float:
    if se == 0 or math.isnan(se):
        return 0.0 if se == 0 else math.inf
    return se / abs(mean) if mean != 0 else math.inf


def _summarize(samples: Mapping[str, list[float]], k: int) -> tuple[dict[str, float], dict[str, float]]:
    mean: dict[str, float] = {}
    se: dict[str, float] = {}
    for n, xs in samples.items():
        xs = xs[:k]
        m = math.fsum(xs) / len(xs)
        mean[n] = m
        if len(xs) < 2:
            se[n] = math.nan
        else:
            var = math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1)
            se[n] = math.sqrt(var / len(xs))
    return mean, se


def _rademacher(w: torch.Tensor, gens: dict[torch.device, torch.Generator], seed: int) -> torch.Tensor:
    gen = gens.get(w.device)
    if gen is None:
        gen = torch.Generator(device=w.device)
        gen.manual_seed(seed)
        gens[w.device] = gen
    v = torch.randint(0, 2, w.shape, generator=gen, device=w.device, dtype=torch.int8)
    return (v * 2 - 1).to(w.dtype)


@contextlib.contextmanager
def _only_these_require_grad(model: nn.Module, weights: Sequence[torch.Tensor]) -> Iterator[None]:
    """Gradients for the target weights only (less work, less memory); restored afterwards."""
    params = list(model.parameters())
    before = [p.requires_grad for p in params]
    target = {id(w) for w in weights}
    extra = [w for w in weights if all(w is not p for p in params)]
    extra_before = [w.requires_grad for w in extra]
    try:
        for p in params:
            p.requires_grad_(id(p) in target)
        for w in extra:
            w.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, b in zip(params, before):
            p.requires_grad_(b)
        for w, b in zip(extra, extra_before):
            w.requires_grad_(b)


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 tensors."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_loss(loss: torch.Tensor) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise MpsError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}")
    return loss.reshape(())


def _probe_hvp(parts: Sequence[Callable[[], torch.Tensor]], weights: Sequence[torch.Tensor],
               probes: Sequence[torch.Tensor]) -> tuple[list[float], list[bool]]:
    acc = [torch.zeros((), dtype=_acc(w), device=w.device) for w in weights]
    reached = [False] * len(weights)
    for part in parts:
        loss = _check_loss(part())
        if not loss.requires_grad:
            continue
        grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
        dot = None
        for i, (g, v) in enumerate(zip(grads, probes)):
            if g is None:
                continue
            reached[i] = True
            term = (g.to(_acc(g)) * v.to(_acc(g))).sum()
            dot = term if dot is None else dot + term.to(dot.device)
        if dot is None or not dot.requires_grad:
            continue  # the loss is linear in every weight: H = 0
        try:
            hv = torch.autograd.grad(dot, weights, allow_unused=True)
        except RuntimeError as exc:
            if _SDPA_HINT in str(exc) or "not implemented" in str(exc):
                raise MpsError(
                    "exact Hessian-vector products need double backward, which this model's attention kernel does not "
                    f"have ({str(exc).splitlines()[0][:160]}); use method='fd' or attn_implementation='eager'"
                ) from None
            raise
        for i, (h, v) in enumerate(zip(hv, probes)):
            if h is not None:
                acc[i] += (h.to(acc[i].dtype) * v.to(acc[i].dtype)).sum().to(acc[i].device)
        del grads, dot, hv, loss
    return [float(a) for a in acc], reached


def _grads(parts: Sequence[Callable[[], torch.Tensor]], weights: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor | None], list[bool]]:
    total: list[torch.Tensor | None] = [None] * len(weights)
    reached = [False] * len(weights)
    for part in parts:
        loss = _check_loss(part())
        if not loss.requires_grad:
            continue
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for i, g in enumerate(grads):
            if g is None:
                continue
            reached[i] = True
            total[i] = g.to(_acc(g)) if total[i] is None else total[i] + g.to(_acc(g))
    return total, reached


def _probe_fd(parts: Sequence[Callable[[], torch.Tensor]], weights: Sequence[torch.Tensor],
              probes: Sequence[torch.Tensor], eps: float) -> tuple[list[float], list[bool]]:
    # One step for all layers (eps x the RMS of all target weights): per-layer steps would
    # weight the cross terms v_l H_lm v_m by step_m / step_l, so a probe's sample would differ
    # from the exact product's (still unbiased, but noisier).
    sq = math.fsum(float(w.detach().to(_acc(w)).pow(2).sum()) for w in weights)
    rms = math.sqrt(sq / sum(w.numel() for w in weights))
    steps = [eps * rms if rms > 0 else eps] * len(weights)
    backup = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():
            for w, v, s in zip(weights, probes, steps):
                w.add_(v, alpha=s)
        g_plus, reached = _grads(parts, weights)
        with torch.no_grad():
            for w, b, v, s in zip(weights, backup, probes, steps):
                w.copy_(b).sub_(v, alpha=s)
        g_minus, _ = _grads(parts, weights)
    finally:
        with torch.no_grad():
            for w, b in zip(weights, backup):
                w.copy_(b)
    out = []
    for gp, gm, v, s in zip(g_plus, g_minus, probes, steps):
        if gp is None or gm is None:
            out.append(0.0)
            continue
        out.append(float(((gp - gm) * v.to(gp.dtype)).sum()) / (2.0 * s))
    return out, reached
