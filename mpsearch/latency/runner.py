"""Running one phase of a workload: :class:`PhaseRunner` (prefill, or one decode step on a KV cache).

Example:
    >>> runner = PhaseRunner(model, Workload(threads=1), "prefill")   # doctest: +SKIP
    >>> runner.time(repeats=5, warmup=1).median_ms                     # doctest: +SKIP
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from mpsearch.errors import MpsError
from mpsearch.latency.timing import Timing, time_callable
from mpsearch.latency.workload import Workload, dummy_inputs


def accepts(fn: Any, name: str) -> bool:
    """True when ``fn``'s signature has a parameter ``name``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def phases(workload: Workload) -> list[str]:
    """The phases a workload times: ``["prefill", "decode"]`` for ``both``, else its own."""
    return ["prefill", "decode"] if workload.phase == "both" else [workload.phase]


class PhaseRunner:
    """Calls the model for one phase of a workload: ``run()`` one timed call, ``reset()`` after it.

    prefill: ``model(**inputs, use_cache=True, logits_to_keep=1)``, what ``generate`` does for
    the first token. decode: a prefill builds the KV cache once; ``run()`` is one step of one
    new token per row and ``reset()`` crops the cache back to the prompt. ``now`` replaces the
    workload's clock (a seconds counter; tests inject a virtual one).

    Example:
        >>> r = PhaseRunner(model, Workload(phase="decode"), "decode")   # doctest: +SKIP
        >>> r.run(); r.reset()                                           # doctest: +SKIP
    """

    def __init__(self, model: Any, workload: Workload, phase: str, inputs: dict[str, Any] | None = None,
                 call: Callable[..., Any] | None = None, now: Callable[[], float] | None = None) -> None:
        import torch

        self.model = model
        self.call = call if call is not None else model
        self.phase = phase
        self.clock = workload.clock
        self.now = now
        self.inputs = dict(inputs) if inputs is not None else dummy_inputs(model, workload)
        forward = getattr(model, "forward", None)
        extra: dict[str, Any] = {}
        if accepts(forward, "logits_to_keep"):
            extra["logits_to_keep"] = 1
        if accepts(forward, "use_cache"):
            extra["use_cache"] = True
        self._reset: Callable[[], None] | None = None
        if phase == "prefill":
            self.kwargs = {**self.inputs, **extra}
            return
        if phase != "decode":
            raise MpsError(f"phase {phase!r}: a runner times 'prefill' or 'decode'")
        cache_arg = "cache" if accepts(forward, "cache") else "past_key_values"
        with torch.inference_mode():
            out = model(**self.inputs, **{**extra, "use_cache": True})
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "crop"):
            raise MpsError(f"{type(model).__name__} returned no croppable KV cache; cannot time a decode step")
        step = self.inputs["input_ids"][:, -1:].clone()
        # No attention mask: the rows are unpadded, and a mask over the whole sequence makes some
        # models (Qwen2-VL's M-RoPE) derive positions for every cached token, not the new one.
        self.kwargs = {"input_ids": step, cache_arg: cache, **extra}
        self._cache = cache
        self._prompt_len = int(cache.get_seq_length())
        self._reset = self._crop

    def _crop(self) -> None:
        extra_tokens = int(self._cache.get_seq_length()) - self._prompt_len
        if extra_tokens > 0:
            self._cache.crop(-extra_tokens)  # negative: remove that many tokens

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
                                 clock=self.clock, now=self.now)


__all__ = ["PhaseRunner", "phases", "accepts"]
