"""End-to-end timing of the whole (already quantized) model: one policy, or several interleaved.

Example:
    >>> apply_policy(model, policy)                                            # doctest: +SKIP
    >>> measure_model_latency(model, policy, Workload(threads=1)).median_ms    # doctest: +SKIP
    41.7
"""
from __future__ import annotations

import math
import sys
from collections import defaultdict
from typing import Any, Iterable, Sequence

from mpsearch.errors import MpsError
from mpsearch.latency.compiled import CompiledLayers, compile_spec, strict_compile
from mpsearch.latency.model_info import current_device_name, layer_name
from mpsearch.latency.runner import PhaseRunner, phases
from mpsearch.latency.timing import Timing, fixed_threads
from mpsearch.latency.workload import Workload

#: Timed calls per visit of one configuration in a round (rounds interleave configurations so
#: that a change of machine load hits all of them alike).
CHUNK = 5


def linear_names(model: Any) -> list[str]:
    """Every Linear slot of the model (plain or swapped by mpsearch)."""
    from mpsearch.formats import current_formats

    return list(current_formats(model))


def measure_model_latency(model: Any, policy: Any = None, workload: Workload | None = None,
                          inputs: dict[str, Any] | None = None) -> Timing:
    """Time the whole model *as it is* (already quantized) on ``workload``; returns a :class:`Timing`.

    ``policy``, when given, must match the formats the model's layers are in now (read from
    the modules mpsearch swapped in); a mismatch raises :class:`MpsError` rather than timing the
    wrong model. ``phase="both"`` times prefill and decode separately and reports
    ``prefill + new_tokens * decode`` per sample. ``float(timing)`` is the median in ms. With
    ``workload.compile`` the Linear layers run compiled code made once per configuration and
    reused across calls (:mod:`mpsearch.latency.compiled`); ``timing.compile`` has the counts.

    Example:
        >>> from mpsearch.formats import apply_policy                  # doctest: +SKIP
        >>> apply_policy(model, policy)                                 # doctest: +SKIP
        >>> measure_model_latency(model, policy, Workload(threads=1)).median_ms  # doctest: +SKIP
        41.7
    """
    workload = workload or Workload()
    if policy is not None:
        check_model_matches(model, policy)
    spec = compile_spec(workload.compile)
    compiled = CompiledLayers(model, linear_names(model), spec) if spec is not None else None
    timings = []
    try:
        with fixed_threads(workload.threads), strict_compile(spec) as counts:
            if compiled is not None:
                compiled.install()
            for phase in phases(workload):
                runner = PhaseRunner(model, workload, phase, inputs)
                timings.append(runner.time(workload.repeats, workload.warmup))
    finally:
        if compiled is not None:
            compiled.remove()
    out = timings[0] if len(timings) == 1 else combine_both(timings[0], timings[1], workload.new_tokens)
    out.device = current_device_name(model)
    out.compile = counts or None
    return out


def combine_both(prefill: Timing, decode: Timing, new_tokens: int) -> Timing:
    """``prefill + new_tokens * decode`` sample by sample (phase ``both``).

    Example:
        >>> float(combine_both(Timing.from_samples([10.0]), Timing.from_samples([1.0]), 4))
        14.0
    """
    n = min(len(prefill.samples_ms), len(decode.samples_ms))
    samples = [p + new_tokens * d for p, d in zip(prefill.samples_ms[:n], decode.samples_ms[:n])]
    peaks = [x for x in (prefill.peak_memory_bytes, decode.peak_memory_bytes) if x is not None]
    return Timing.from_samples(samples, peak_memory_bytes=max(peaks) if peaks else None, threads=prefill.threads)


def check_model_matches(model: Any, policy: Any) -> None:
    """Raise :class:`MpsError` if the model's current layer formats differ from ``policy``'s.

    Example:
        >>> check_model_matches(model, Policy({}, default="fp32"))   # doctest: +SKIP
    """
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

    Example:
        >>> ts = measure_policies(model, layers, uniform_policies(space, layers), Workload(threads=1))  # doctest: +SKIP
        >>> [round(float(t), 1) for t in ts]                                                          # doctest: +SKIP
    """
    from mpsearch.formats import ModuleBank

    workload = workload or Workload()
    names = [layer_name(x) for x in layers]
    if bank is None:
        fmts = sorted({p.format_for(n) for p in policies for n in names})
        bank = ModuleBank(model, names, fmts)
    rounds = rounds or max(1, math.ceil(workload.repeats / CHUNK))
    per = max(1, math.ceil(workload.repeats / rounds))
    spec = compile_spec(workload.compile)
    compiled = CompiledLayers(model, names, spec) if spec is not None else None
    samples: list[dict[str, list[float]]] = [defaultdict(list) for _ in policies]
    peaks: list[int | None] = [None] * len(policies)
    iterator: Iterable[int] = range(rounds)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="timing policies", unit="round", file=sys.stderr)
    try:
        with fixed_threads(workload.threads), strict_compile(spec) as counts:
            runners: dict[str, PhaseRunner] = {}
            for r in iterator:
                for i, pol in enumerate(policies):
                    if compiled is not None:
                        compiled.remove()
                    bank.apply(pol)
                    if compiled is not None:
                        compiled.install()
                    for phase in phases(workload):
                        if phase not in runners:
                            runners[phase] = PhaseRunner(model, workload, phase)
                        t = runners[phase].time(per, workload.warmup if r == 0 else 1)
                        samples[i][phase].extend(t.samples_ms)
                        if t.peak_memory_bytes is not None:
                            peaks[i] = max(peaks[i] or 0, t.peak_memory_bytes)
    finally:
        if compiled is not None:
            compiled.remove()
        bank.restore()
    return _timings(samples, peaks, workload, current_device_name(model), counts or None)


def _timings(samples: list[dict[str, list[float]]], peaks: list[int | None], workload: Workload, device: str,
             counts: dict[str, Any] | None) -> list[Timing]:
    out = []
    for per_phase, peak in zip(samples, peaks):
        if workload.phase == "both":
            t = combine_both(Timing.from_samples(per_phase["prefill"]), Timing.from_samples(per_phase["decode"]),
                             workload.new_tokens)
        else:
            t = Timing.from_samples(per_phase[workload.phase])
        t.peak_memory_bytes, t.device, t.compile = peak, device, counts
        out.append(t)
    return out


__all__ = ["measure_model_latency", "measure_policies", "check_model_matches", "combine_both", "linear_names",
           "CHUNK"]
