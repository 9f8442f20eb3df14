"""Measuring: the per-layer latency table and end-to-end timings of (quantized) models.

Two ways to fill the table, both costing a number of timings that depends on the model's
*unique* layer shapes and the formats, not on its number of layers:

* ``method="context"`` (default without ``compile``): the real model runs the workload in
  several configurations (the reference; each format swapped into every layer that may take it;
  ``mixed`` random policies of the space), swapped through a :class:`mpsearch.formats.ModuleBank`,
  with forward hooks timing every Linear call *in context* (neighbours evicting its weights and
  code from the caches, the real inputs, the real thread pool). Times are pooled per unique key
  ``(in, out, bias, rows per call, format)``: all layers of one key share one figure, so a model
  with twice the layers of the same shapes needs the same number of forward passes. Each
  configuration is also timed end to end without hooks, in the same interleaved rounds; least
  squares on ``end-to-end - sum of Linear times = base + sum_f overhead_f * layers in f`` gives
  the base term and a per-format overhead outside the Linear calls (added to each layer's entry;
  the reference format's is 0), so the table stays additive.
* ``method="isolated"`` (used with ``compile``): each unique key is timed alone, a module built
  by ``get_format(fmt).make_module(nn.Linear(in, out))`` with random weights on an input of
  ``(tokens, in)``; base = the full-precision model minus the sum of its layers' isolated times.

Example:
    >>> lat = measure_latency_table(model, layers, space, Workload(threads=1))  # doctest: +SKIP
    >>> lat.predict(policy), float(measure_model_latency(model, None, Workload()))  # doctest: +SKIP
"""
from __future__ import annotations

import inspect
import math
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from mpsearch.artifacts import device_name as _device_name
from mpsearch.errors import MpsError
from mpsearch.latency.table import LatencyTable, library_key, load_cached, store_cached
from mpsearch.latency.timing import Timing, fixed_threads, is_cuda, time_callable
from mpsearch.latency.workload import Workload, describe_inputs, dummy_inputs, model_arch, token_counts

METHODS = ("auto", "context", "isolated")
#: Timed calls per visit of one configuration in a round (rounds interleave configurations so
#: that a change of machine load hits all of them alike).
CHUNK = 5
#: Seed of the mixed configurations the context method times (validation uses other seeds).
MIXED_SEED = 1_000_003


# -- helpers ---------------------------------------------------------------------------------
def current_device_name(model: Any) -> str:
    """Name of the device the model's parameters live on (GPU name, or the CPU model)."""
    p = next(model.parameters(), None)
    return _device_name(p.device if p is not None else "cpu")


def _model_label(model: Any) -> str:
    try:
        from mpsearch.models import model_source

        return model_source(model)
    except Exception:  # noqa: BLE001 - a model not loaded by load_vlm has no recorded source
        return str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)


def _dtype_name(model: Any) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return "float32"


def _layer_name(layer: Any) -> str:
    return str(getattr(layer, "name", layer))


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr)


def _check_unquantized(model: Any, names: Sequence[str], what: str) -> dict[str, str]:
    from mpsearch.formats import DTYPE_FORMATS, current_formats

    cur = current_formats(model)
    plain = set(DTYPE_FORMATS.values())
    done = [(n, cur[n]) for n in names if n in cur and cur[n] not in plain]
    if done:
        raise MpsError(f"{what} needs the full-precision model; layer {done[0][0]!r} is already {done[0][1]}")
    missing = [n for n in names if n not in cur]
    if missing:
        raise MpsError(f"layer {missing[0]!r} is not a Linear layer of this model (see `mpsearch layers MODEL`)")
    return {n: cur[n] for n in names}


# -- running the workload --------------------------------------------------------------------
class PhaseRunner:
    """Calls the model for one phase of a workload: ``run()`` one timed call, ``reset()`` after it.

    prefill: ``model(**inputs, use_cache=True, logits_to_keep=1)``, what ``generate`` does for
    the first token. decode: a prefill builds the KV cache once; ``run()`` is one step of one
    new token per row and ``reset()`` crops the cache back to the prompt.
    """

    def __init__(self, model: Any, workload: Workload, phase: str, inputs: dict[str, Any] | None = None,
                 call: Callable[..., Any] | None = None) -> None:
        import torch

        self.model = model
        self.call = call if call is not None else model
        self.phase = phase
        self.clock = workload.clock
        self.inputs = dict(inputs) if inputs is not None else dummy_inputs(model, workload)
        extra: dict[str, Any] = {}
        forward = getattr(model, "forward", None)
        if _accepts(forward, "logits_to_keep"):
            extra["logits_to_keep"] = 1
        if _accepts(forward, "use_cache"):
            extra["use_cache"] = True
        self._extra = extra
        self._reset: Callable[[], None] | None = None
        if phase == "prefill":
            self.kwargs = {**self.inputs, **extra}
            return
        if phase != "decode":
            raise MpsError(f"phase {phase!r}: a runner times 'prefill' or 'decode'")
        cache_arg = "cache" if _accepts(forward, "cache") else "past_key_values"
        with torch.inference_mode():
            out = model(**self.inputs, **{**extra, "use_cache": True})
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "crop"):
            raise MpsError(f"{type(model).__name__} returned no croppable KV cache; cannot time a decode step")
        ids = self.inputs["input_ids"]
        step = ids[:, -1:].clone()
        # No attention mask: the rows are unpadded, and a mask over the whole sequence makes some
        # models (Qwen2-VL's M-RoPE) derive positions for every cached token, not the new one.
        self.kwargs = {"input_ids": step, cache_arg: cache, **extra}
        self._cache = cache
        self._prompt_len = int(cache.get_seq_length())

        def reset() -> None:
            extra_tokens = int(self._cache.get_seq_length()) - self._prompt_len
            if extra_tokens > 0:
                self._cache.crop(-extra_tokens)  # negative: remove that many tokens

        self._reset = reset

    def run(self) -> Any:
        """One call of the phase."""
        return self.call(**self.kwargs)

    def reset(self) -> None:
        """Undo the call's side effects (the decode step's cache growth); untimed."""
        if self._reset is not None:
            self._reset()

    def time(self, repeats: int, warmup: int) -> Timing:
        """Timing of ``repeats`` calls after ``warmup`` calls."""
        import torch

        with torch.inference_mode():
            return time_callable(self.run, repeats=repeats, warmup=warmup, device=self.model, reset=self.reset,
                                 clock=self.clock)


def _phases(workload: Workload) -> list[str]:
    return ["prefill", "decode"] if workload.phase == "both" else [workload.phase]


def _compiled(model: Any, workload: Workload) -> Callable[..., Any] | None:
    if not workload.compile:
        return None
    import torch

    mode = None if workload.compile is True else str(workload.compile)
    try:
        return torch.compile(model, mode=mode)
    except Exception as exc:  # noqa: BLE001 - report what torch.compile refused, in one line
        raise MpsError(f"torch.compile (mode {mode or 'default'}) failed: {str(exc).splitlines()[0]}") from None


# -- end-to-end timing -----------------------------------------------------------------------
def measure_model_latency(model: Any, policy: Any = None, workload: Workload | None = None,
                          inputs: dict[str, Any] | None = None) -> Timing:
    """Time the whole model *as it is* (already quantized) on ``workload``; returns a :class:`Timing`.

    ``policy``, when given, must match the formats the model's layers are in now (read from
    the modules mpsearch swapped in); a mismatch raises :class:`MpsError` rather than timing the
    wrong model. ``phase="both"`` times prefill and decode separately and reports
    ``prefill + new_tokens * decode`` per sample. ``float(timing)`` is the median in ms.

    Example:
        >>> from mpsearch.formats import apply_policy                  # doctest: +SKIP
        >>> apply_policy(model, policy)                                 # doctest: +SKIP
        >>> measure_model_latency(model, policy, Workload(threads=1)).median_ms  # doctest: +SKIP
        41.7
    """
    workload = workload or Workload()
    if policy is not None:
        check_model_matches(model, policy)
    call = _compiled(model, workload)
    timings = []
    with fixed_threads(workload.threads):
        for phase in _phases(workload):
            runner = PhaseRunner(model, workload, phase, inputs, call=call)
            timings.append(runner.time(workload.repeats, workload.warmup))
    out = timings[0] if len(timings) == 1 else combine_both(timings[0], timings[1], workload.new_tokens)
    out.device = current_device_name(model)
    return out


def combine_both(prefill: Timing, decode: Timing, new_tokens: int) -> Timing:
    """``prefill + new_tokens * decode`` sample by sample (phase ``both``)."""
    n = min(len(prefill.samples_ms), len(decode.samples_ms))
    samples = [p + new_tokens * d for p, d in zip(prefill.samples_ms[:n], decode.samples_ms[:n])]
    peaks = [x for x in (prefill.peak_memory_bytes, decode.peak_memory_bytes) if x is not None]
    return Timing.from_samples(samples, peak_memory_bytes=max(peaks) if peaks else None, threads=prefill.threads)


def check_model_matches(model: Any, policy: Any) -> None:
    """Raise :class:`MpsError` if the model's current layer formats differ from ``policy``'s."""
    from mpsearch.formats import current_formats

    cur = current_formats(model)
    explicit = getattr(policy, "formats", {}) or {}
    unknown = [n for n in explicit if n not in cur]
    if unknown:
        raise MpsError(f"policy sets layer {unknown[0]!r}, which is not a Linear layer of this model")
    wrong = [(n, f, policy.format_for(n)) for n, f in cur.items() if policy.format_for(n) != f]
    if wrong:
        n, have, want = wrong[0]
        more = f" (and {len(wrong) - 1} more layers)" if len(wrong) > 1 else ""
        raise MpsError(
            f"the model does not carry the policy: layer {n!r} is {have}, the policy says {want}{more}; "
            "apply it first (mpsearch.apply_policy) or pass policy=None to time the model as it is"
        )


def measure_policies(model: Any, layers: Sequence[Any], policies: Sequence[Any], workload: Workload | None = None,
                     bank: Any = None, rounds: int | None = None, progress: bool = False) -> list[Timing]:
    """Time several policies on one model, interleaved round-robin; returns one Timing each.

    Each policy is swapped in through a :class:`mpsearch.formats.ModuleBank` (modules built once)
    and timed ``workload.repeats`` times in all, spread over ``rounds`` visits so that a change of
    machine load affects every policy alike. The model is restored afterwards.
    """
    from mpsearch.formats import ModuleBank

    workload = workload or Workload()
    names = [_layer_name(x) for x in layers]
    if bank is None:
        fmts = sorted({p.format_for(n) for p in policies for n in names})
        bank = ModuleBank(model, names, fmts)
    rounds = rounds or max(1, math.ceil(workload.repeats / CHUNK))
    per = max(1, math.ceil(workload.repeats / rounds))
    call = _compiled(model, workload)
    samples: list[dict[str, list[float]]] = [defaultdict(list) for _ in policies]
    peaks: list[int | None] = [None] * len(policies)
    iterator: Iterable[int] = range(rounds)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="timing policies", unit="round", file=sys.stderr)
    try:
        with fixed_threads(workload.threads):
            runners: dict[str, PhaseRunner] = {}
            for r in iterator:
                for i, pol in enumerate(policies):
                    bank.apply(pol)
                    for phase in _phases(workload):
                        if phase not in runners:
                            runners[phase] = PhaseRunner(model, workload, phase, call=call)
                        warm = workload.warmup if r == 0 else 1
                        t = runners[phase].time(per, warm)
                        samples[i][phase].extend(t.samples_ms)
                        if t.peak_memory_bytes is not None:
                            peaks[i] = max(peaks[i] or 0, t.peak_memory_bytes)
    finally:
        bank.restore()
    dev = current_device_name(model)
    out = []
    for i in range(len(policies)):
        if workload.phase == "both":
            t = combine_both(Timing.from_samples(samples[i]["prefill"]), Timing.from_samples(samples[i]["decode"]),
                             workload.new_tokens)
        else:
            t = Timing.from_samples(samples[i][workload.phase])
        t.peak_memory_bytes = peaks[i]
        t.device = dev
        out.append(t)
    return out


# -- hooks timing every Linear call in context ------------------------------------------------
class _LayerClock:
    """Forward hooks on the modules in the Linear slots: time (and count rows of) every call."""

    def __init__(self, model: Any, names: Sequence[str], cuda: bool, recording_rows: bool = False,
                 clock: str = "wall") -> None:
        from mpsearch.latency.timing import clock_fn
        from mpsearch.models import get_module

        self.cuda = cuda
        self._now = clock_fn(clock)
        self.recording_rows = recording_rows
        self.names = list(names)
        self.rows: dict[str, list[int]] = {}
        self._pending: list[tuple[str, Any, Any]] = []
        self._t0: dict[str, Any] = {}
        self._acc: dict[str, float] = defaultdict(float)
        self._handles = []
        for n in self.names:
            m = get_module(model, n)
            self._handles.append(m.register_forward_pre_hook(self._pre(n)))
            self._handles.append(m.register_forward_hook(self._post(n)))

    def _pre(self, name: str) -> Callable[..., None]:
        if self.cuda:
            import torch

            def hook(_m: Any, args: Any) -> None:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self._t0[name] = ev
                self._rows(name, args)
        else:
            def hook(_m: Any, args: Any) -> None:
                self._rows(name, args)
                self._t0[name] = self._now()
        return hook

    def _post(self, name: str) -> Callable[..., None]:
        if self.cuda:
            import torch

            def hook(_m: Any, _args: Any, _out: Any) -> None:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self._pending.append((name, self._t0.pop(name), ev))
        else:
            def hook(_m: Any, _args: Any, _out: Any) -> None:
                t1 = self._now()
                self._acc[name] += (t1 - self._t0.pop(name)) * 1e3
        return hook

    def _rows(self, name: str, args: Any) -> None:
        if self.recording_rows and args:
            x = args[0]
            self.rows.setdefault(name, []).append(int(x.numel() // max(1, x.shape[-1])))

    def collect(self) -> dict[str, float]:
        """Milliseconds per layer of the forward just run (0 for layers not called); resets."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            for name, a, b in self._pending:
                self._acc[name] += a.elapsed_time(b)
            self._pending.clear()
        out = {n: self._acc.get(n, 0.0) for n in self.names}
        self._acc = defaultdict(float)
        return out

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class _PhaseResult:
    base_ms: float
    ms: dict[str, dict[str, float]]
    rows: dict[str, list[int]]
    keys: int
    forwards: int
    isolated_timings: int = 0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _key(slot: tuple[int, int, bool], rows: Sequence[int], fmt: str) -> tuple[Any, ...]:
    """The unique key a timing is shared by: ``(in, out, bias, rows per call, format)``."""
    return (slot[0], slot[1], slot[2], tuple(rows), fmt)


def _stat(values: Sequence[float], stat: str) -> float:
    return min(values) if stat == "min" else statistics.median(values)


def _passes(names: Sequence[str], cands: dict[str, list[str]], ref: dict[str, str],
            mixed: Sequence[dict[str, str]] = ()) -> list[tuple[str, dict[str, str]]]:
    """The configurations run in context: the reference, each format wherever allowed, then the
    ``mixed`` ones (random policies of the space); duplicates are run once."""
    out = [("reference", dict(ref))]
    seen = {tuple(ref[n] for n in names)}
    formats: list[str] = []
    for n in names:
        for f in cands[n]:
            if f not in formats:
                formats.append(f)
    candidates = [(f"uniform {f}", {n: (f if f in cands[n] else ref[n]) for n in names}) for f in formats]
    candidates += [(f"mixed {i}", {n: m[n] for n in names}) for i, m in enumerate(mixed)]
    for label, mapping in candidates:
        sig = tuple(mapping[n] for n in names)
        if sig not in seen:
            seen.add(sig)
            out.append((label, mapping))
    return out


def _fit_overheads(passes: Sequence[tuple[str, dict[str, str]]], rest_ms: Sequence[float], runs: dict[str, bool],
                   ref_formats: set[str]) -> tuple[float, dict[str, float], list[float]]:
    """Least squares ``rest(pass) = base + sum_f overhead_f * (layers in f that run)``.

    ``rest`` is a configuration's end-to-end time minus its Linear layers' in-context times:
    the work outside the Linear calls, which the formats around it slow down or speed up
    (caches, allocations). The reference format's overhead is 0 (it is in the base).
    Returns ``(base, {format: overhead per layer}, relative residuals)``.
    """
    import numpy as np

    formats = sorted({f for _, m in passes for n, f in m.items() if runs[n]} - ref_formats)
    X = np.array([[1.0] + [sum(1 for n, f in m.items() if runs[n] and f == g) for g in formats] for _, m in passes])
    y = np.array(rest_ms, dtype=float)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = (X @ coef - y) / np.maximum(np.abs(y), 1e-9)
    return float(coef[0]), {g: float(c) for g, c in zip(formats, coef[1:])}, [float(r) for r in resid]


def _observe_rows(model: Any, names: Sequence[str], runner: PhaseRunner) -> dict[str, list[int]]:
    """Rows each Linear call sees in one forward of the phase (empty list: not called)."""
    import torch

    clock = _LayerClock(model, names, cuda=False, recording_rows=True)
    try:
        with torch.inference_mode():
            runner.run()
            runner.reset()
    finally:
        clock.remove()
    return {n: clock.rows.get(n, []) for n in names}


def _measure_context(model: Any, slots: dict[str, Any], cands: dict[str, list[str]], ref: dict[str, str],
                     workload: Workload, phase: str, progress: bool,
                     mixed: Sequence[dict[str, str]] = ()) -> _PhaseResult:
    """In-context timing (see the module docstring), in interleaved rounds over the configurations."""
    import torch
    from mpsearch.formats import ModuleBank
    from mpsearch.policy import Policy

    names = list(slots)
    cuda = is_cuda(model)
    runner = PhaseRunner(model, workload, phase)
    rows = _observe_rows(model, names, runner)
    runs = {n: bool(rows[n]) for n in names}
    passes = _passes(names, cands, ref, mixed)
    all_formats = sorted({f for _, m in passes for f in m.values()})
    bank = ModuleBank(model, names, all_formats)
    rounds = max(1, math.ceil(workload.repeats / CHUNK))
    per = max(1, math.ceil(workload.repeats / rounds))
    e2e: list[list[float]] = [[] for _ in passes]
    pooled: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    forwards = 0
    iterator: Iterable[int] = range(rounds)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"latency table ({phase}, {len(passes)} configurations)", unit="round",
                        file=sys.stderr)
    try:
        with torch.inference_mode():
            for r in iterator:
                warm = workload.warmup if r == 0 else 1
                for i, (_label, mapping) in enumerate(passes):
                    bank.apply(Policy(mapping, default=ref[names[0]] if names else "fp32"))
                    t = time_callable(runner.run, repeats=per, warmup=warm, device=model, reset=runner.reset,
                                      clock=workload.clock)
                    e2e[i].extend(t.samples_ms)
                    clock = _LayerClock(model, names, cuda, clock=workload.clock)
                    try:
                        for _ in range(per):
                            runner.run()
                            runner.reset()
                            times = clock.collect()
                            for n in names:
                                pooled[_key(slots[n], rows[n], mapping[n])].append(times[n])
                    finally:
                        clock.remove()
                    forwards += 2 * per + warm
    finally:
        bank.restore()
    key_ms = {k: _stat(v, workload.stat) for k, v in pooled.items()}
    rest = [_stat(e2e[i], workload.stat) - sum(key_ms[_key(slots[n], rows[n], m[n])] for n in names)
            for i, (_, m) in enumerate(passes)]
    base, overhead, resid = _fit_overheads(passes, rest, runs, set(ref.values()))
    ms = {n: {f: key_ms[_key(slots[n], rows[n], f)] + (overhead.get(f, 0.0) if runs[n] else 0.0) for f in cands[n]}
          for n in names}
    notes = []
    if base < 0:
        notes.append(f"{phase}: base term came out negative ({base:.3f} ms): timing noise exceeds the non-Linear work")
    negative = sorted((n, f) for n, row in ms.items() for f, v in row.items() if v < 0)
    if negative:
        notes.append(f"{phase}: {len(negative)} layer entries came out negative after the overhead fit "
                     f"(e.g. {negative[0][0]} in {negative[0][1]}) and were set to 0: timing noise dominates "
                     "those layers; more repeats or a quieter machine help")
        for n, f in negative:
            ms[n][f] = 0.0
    extra = {"configurations": [label for label, _ in passes], "overhead_ms_per_layer": overhead,
             "rest_ms": dict(zip([label for label, _ in passes], rest)),
             "fit_residual_median": statistics.median(abs(x) for x in resid),
             "fit_residual_max": max(abs(x) for x in resid)}
    return _PhaseResult(base, ms, rows, len(key_ms), forwards, 0, notes, extra)


def _time_unique(key: tuple[Any, ...], dtype: Any, device: Any, workload: Workload) -> float:
    """Time one unique (in, out, bias, rows, format) alone: a fresh module on a random input."""
    import torch
    from torch import nn
    from mpsearch.formats import DTYPE_FORMATS, get_format

    in_f, out_f, bias, rows, fmt = key
    if not rows:
        return 0.0
    lin = nn.Linear(in_f, out_f, bias=bias, device=device, dtype=dtype)
    module = lin if DTYPE_FORMATS.get(dtype) == fmt else get_format(fmt).make_module(lin)
    module.eval()
    fn: Callable[..., Any] = module
    if workload.compile:
        fn = torch.compile(module, mode=None if workload.compile is True else str(workload.compile))
    total = 0.0
    with torch.inference_mode():
        for n_rows in rows:
            x = torch.randn(n_rows, in_f, device=device, dtype=dtype)
            t = time_callable(lambda: fn(x), repeats=workload.repeats, warmup=workload.warmup, device=device,
                              clock=workload.clock)
            total += t.value(workload.stat)
    return total


def _measure_isolated(model: Any, slots: dict[str, Any], cands: dict[str, list[str]], ref: dict[str, str],
                      workload: Workload, phase: str, progress: bool) -> _PhaseResult:
    names = list(slots)
    call = _compiled(model, workload)
    runner = PhaseRunner(model, workload, phase, call=call)
    rows = _observe_rows(model, names, PhaseRunner(model, workload, phase))
    p = next(model.parameters())
    unique: dict[tuple[Any, ...], float] = {}
    for n in names:
        for f in list(cands[n]) + [ref[n]]:
            unique.setdefault(_key(slots[n], rows[n], f), math.nan)
    keys: Iterable[tuple[Any, ...]] = list(unique)
    if progress:
        from tqdm import tqdm

        keys = tqdm(keys, desc=f"latency table ({phase}, unique shapes x formats)", unit="key", file=sys.stderr)
    for k in keys:
        unique[k] = _time_unique(k, p.dtype, p.device, workload)
    t = runner.time(workload.repeats, workload.warmup)
    ms = {n: {f: unique[_key(slots[n], rows[n], f)] for f in cands[n]} for n in names}
    base = t.value(workload.stat) - sum(unique[_key(slots[n], rows[n], ref[n])] for n in names)
    notes = []
    if base < 0:
        notes.append(f"{phase}: base term came out negative ({base:.3f} ms): isolated layers run slower than in the model")
    return _PhaseResult(base, ms, rows, len(unique), workload.repeats + workload.warmup, len(unique), notes)


# -- the table -------------------------------------------------------------------------------
def table_cache_key(model: Any, layers: Sequence[Any], workload: Workload, method: str,
                    candidates: dict[str, list[str]]) -> dict[str, Any]:
    """Everything that changes a measured table: device, dtype, threads, workload, method,
    layer shapes and candidate formats, library versions, model."""
    import hashlib
    import json

    import torch

    from mpsearch.formats import current_formats

    cur = current_formats(model)
    layer_sig = [[_layer_name(x), cur.get(_layer_name(x)), candidates[_layer_name(x)]] for x in layers]
    p = next(model.parameters())
    return {
        "model": _model_label(model),
        "arch": model_arch(model),
        "device": current_device_name(model),
        "dtype": _dtype_name(model),
        "threads": workload.threads or torch.get_num_threads(),
        "workload": workload.timing_key(),
        "method": method,
        "layers": hashlib.sha1(json.dumps(layer_sig).encode()).hexdigest()[:16],
        "shapes": _shape_signature(model, layers),
        "formats": sorted({f for c in candidates.values() for f in c}),
        "versions": library_key(),
        "cuda": torch.version.cuda if p.device.type == "cuda" else None,
    }


def _shape_signature(model: Any, layers: Sequence[Any]) -> str:
    import hashlib

    from mpsearch.models import get_module

    shapes = []
    for x in layers:
        m = get_module(model, _layer_name(x))
        shapes.append([m.in_features, m.out_features, getattr(m, "bias", None) is not None])
    return hashlib.sha1(repr(shapes).encode()).hexdigest()[:16]


def _resolve_method(method: str, workload: Workload) -> str:
    if method not in METHODS:
        raise MpsError(f"latency method {method!r}; valid: {', '.join(METHODS)}")
    if method == "auto":
        return "isolated" if workload.compile else "context"
    if method == "context" and workload.compile:
        raise MpsError("method 'context' times layers with forward hooks, which torch.compile does not keep; "
                       "use method 'isolated' (or 'auto') with a compiled workload")
    return method


def measure_latency_table(model: Any, layers: Sequence[Any], space: Any, workload: Workload | None = None,
                          cache_dir: str | None = None, *, method: str = "auto", mixed: int | None = None,
                          progress: bool = True, log: Callable[[str], None] | None = None) -> LatencyTable:
    """Measure ``base_ms`` and ``ms[layer][format]`` for every layer and candidate format of ``space``.

    ``layers`` are :class:`mpsearch.models.Layer` objects (``discover_layers(model)``); the model
    must be in full precision and is left as it was found. See the module docstring for the
    ``context`` and ``isolated`` methods; ``mixed`` is the number of random policies of the space
    the context method runs besides the reference and the uniform ones (default: twice the number of
    formats), so that layers are also timed next to layers of other formats. With ``cache_dir``, a table measured under exactly the
    same key (device, dtype, threads, workload, method, layers, formats, library versions) is
    reused, and tables measured under another key are named and not used.

    Example:
        >>> model, _ = load_vlm("tiny:llava")                                       # doctest: +SKIP
        >>> lat = measure_latency_table(model, discover_layers(model), SearchSpace.from_yaml("cpu"),
        ...                             Workload(threads=1))                        # doctest: +SKIP
        >>> round(lat.predict(Policy({}, default="torch.int8dyn")), 2)             # doctest: +SKIP
        3.1
    """
    import torch

    from mpsearch.models import get_module

    log = log or _log_default
    workload = workload or Workload()
    method = _resolve_method(method, workload)
    layers = list(layers)
    names = [_layer_name(x) for x in layers]
    if len(set(names)) != len(names):
        raise MpsError("measure_latency_table: a layer is listed twice")
    ref = _check_unquantized(model, names, "measure_latency_table")
    dev = next(model.parameters()).device
    if hasattr(space, "check_device"):
        space.check_device(dev.type)
    cands = {n: list(space.candidates(x)) for n, x in zip(names, layers)}
    n_formats = len({f for c in cands.values() for f in c})
    n_mixed = (2 * n_formats if n_formats > 1 else 0) if mixed is None else int(mixed)
    if n_mixed < 0:
        raise MpsError(f"mixed must be >= 0, got {mixed}")
    key = table_cache_key(model, layers, workload, method, cands)
    key["mixed"] = n_mixed if method == "context" else None
    if cache_dir is not None:
        cached = load_cached(cache_dir, key, log=log)
        if cached is not None:
            return cached
    slots = {}
    for n in names:
        m = get_module(model, n)
        slots[n] = (int(m.in_features), int(m.out_features), getattr(m, "bias", None) is not None)
    mixes: list[dict[str, str]] = []
    if method == "context" and n_mixed:
        from mpsearch.latency.validate import random_policies

        mixes = [p.resolve(names).formats for p in random_policies(space, layers, n_mixed, seed=MIXED_SEED)]
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with fixed_threads(workload.threads) as threads:
            results = []
            for phase in _phases(workload):
                wp = workload.with_(phase=phase)
                if method == "context":
                    r = _measure_context(model, slots, cands, ref, wp, phase, progress, mixes)
                else:
                    r = _measure_isolated(model, slots, cands, ref, wp, phase, progress)
                results.append((phase, r))
    finally:
        model.train(was_training)
    if workload.phase == "both":
        (_, pre), (_, dec) = results
        n = workload.new_tokens
        base = pre.base_ms + n * dec.base_ms
        ms = {l: {f: pre.ms[l][f] + n * dec.ms[l][f] for f in cands[l]} for l in names}
    else:
        base, ms = results[0][1].base_ms, results[0][1].ms
    for _, r in results:
        for note in r.notes:
            log(f"latency: warning: {note}")
    meta = _table_meta(model, layers, workload, method, threads, results, key, time.perf_counter() - start, log)
    table = LatencyTable(base, ms, meta)
    if cache_dir is not None:
        path = store_cached(cache_dir, key, table)
        log(f"latency cache: stored {path}")
    return table


def _table_meta(model: Any, layers: Sequence[Any], workload: Workload, method: str, threads: int,
                results: list[tuple[str, _PhaseResult]], key: dict[str, Any], seconds: float,
                log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from mpsearch.artifacts import provenance

    groups = {_layer_name(x): getattr(x, "group", None) for x in layers}
    observed: dict[str, dict[str, list[list[int]]]] = {}
    derived: dict[str, Any] | None = None
    for phase, r in results:
        by_group: dict[str, list[list[int]]] = {}
        for n, rows in r.rows.items():
            g = groups.get(n) or "?"
            if rows not in by_group.setdefault(g, []):
                by_group[g].append(rows)
        observed[phase] = by_group
    if workload.inputs is None and workload.processor is None:
        try:
            derived = {}
            for phase, _ in results:
                tc = token_counts(model, workload.with_(phase=phase))
                derived[phase] = tc.to_dict()
                for g, want in tc.per_group.items():
                    seen = observed[phase].get(g)
                    if seen is None:
                        continue
                    flat = {sum(r) for r in seen}
                    if flat != {want} and not (want == 0 and flat == {0}):
                        log(f"latency: note: {phase} {g} layers see {sorted(flat)} rows per call, the config "
                            f"derivation says {want}; the table uses the observed rows")
        except MpsError as exc:
            derived = {"error": str(exc)}
    p = next(model.parameters())
    meta: dict[str, Any] = {
        "device": key["device"],
        "model": key["model"],
        "arch": key["arch"],
        "dtype": key["dtype"],
        "threads": threads,
        "workload": workload.to_dict(),
        "method": method,
        "stat": workload.stat,
        "unique_keys": {phase: r.keys for phase, r in results},
        "forward_passes": {phase: r.forwards for phase, r in results},
        "isolated_timings": {phase: r.isolated_timings for phase, r in results},
        "base_ms_by_phase": {phase: r.base_ms for phase, r in results},
        "fit": {phase: r.extra for phase, r in results if r.extra},
        "rows_observed": observed,
        "tokens_derived": derived,
        "layer_groups": {n: g for n, g in groups.items()},
        "seconds": round(seconds, 2),
        "cache_key": key,
        "cuda": torch.version.cuda if p.device.type == "cuda" else None,
    }
    if workload.inputs is not None:
        meta["inputs"] = describe_inputs(workload.inputs)
    meta["provenance"] = provenance(device=key["device"], model=key["model"], dtype=key["dtype"], threads=threads,
                                    workload=workload.to_dict(), method=method, cuda=meta["cuda"])
    return meta


__all__ = [
    "measure_latency_table", "measure_model_latency", "measure_policies", "check_model_matches",
    "PhaseRunner", "current_device_name", "table_cache_key", "combine_both", "METHODS",
]
