"""Timers: CUDA events on GPU, ``perf_counter`` on CPU; warm-up, repeats, median and spread.

Example:
    >>> t = time_callable(lambda: sum(range(1000)), repeats=5, warmup=1)
    >>> t.median_ms > 0, len(t.samples_ms)
    (True, 5)
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence


@dataclass
class Timing:
    """Repeated timings of one call, in milliseconds.

    ``median_ms`` is the headline; ``spread_ms`` the inter-quartile range; ``min_ms`` the best
    call; ``peak_memory_bytes`` the CUDA peak allocated memory during the timed calls (None on
    CPU). ``float(timing)`` is the median.

    Example:
        >>> t = Timing.from_samples([3.0, 1.0, 2.0])
        >>> float(t), t.min_ms
        (2.0, 1.0)
    """

    median_ms: float
    spread_ms: float
    min_ms: float
    samples_ms: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    threads: int | None = None
    device: str = ""
    compile: dict[str, Any] | None = None

    def __float__(self) -> float:
        return float(self.median_ms)

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], **extra: Any) -> "Timing":
        """Median, IQR and min of the samples."""
        s = sorted(float(x) for x in samples_ms)
        if not s:
            raise ValueError("no timing samples")
        return cls(statistics.median(s), iqr(s), s[0], list(map(float, samples_ms)), **extra)

    def value(self, stat: str = "median") -> float:
        """The statistic named by a workload's ``stat`` (``median`` or ``min``)."""
        return self.min_ms if stat == "min" else self.median_ms

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {"median_ms": self.median_ms, "spread_ms": self.spread_ms, "min_ms": self.min_ms,
                "samples_ms": self.samples_ms, "peak_memory_bytes": self.peak_memory_bytes,
                "threads": self.threads, "device": self.device, "compile": self.compile}


def iqr(values: Sequence[float]) -> float:
    """Inter-quartile range (p75 - p25, linear interpolation); 0 for fewer than 2 values."""
    s = sorted(values)
    if len(s) < 2:
        return 0.0
    return quantile(s, 0.75) - quantile(s, 0.25)


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Quantile of already sorted values by linear interpolation."""
    n = len(sorted_values)
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[int]:
    """Set ``torch.set_num_threads(threads)`` for the block (None: keep); yields the count in force."""
    import torch

    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def is_cuda(device: Any) -> bool:
    """True for a CUDA device (or a tensor/module on one)."""
    import torch

    if isinstance(device, torch.nn.Module):
        p = next(device.parameters(), None)
        device = p.device if p is not None else "cpu"
    elif isinstance(device, torch.Tensor):
        device = device.device
    return torch.device(device).type == "cuda"


def clock_fn(clock: str) -> Callable[[], float]:
    """The seconds counter of a clock name: ``wall`` -> ``perf_counter``, ``cpu`` -> ``thread_time``."""
    if clock == "wall":
        return time.perf_counter
    if clock == "cpu":
        return time.thread_time
    from mpsearch.errors import MpsError

    raise MpsError(f"unknown clock {clock!r}; valid: wall, cpu")


def time_callable(
    fn: Callable[[], Any],
    repeats: int = 30,
    warmup: int = 5,
    device: Any = "cpu",
    reset: Callable[[], Any] | None = None,
    clock: str = "wall",
    now: Callable[[], float] | None = None,
) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls.

    On CUDA each call is bracketed by CUDA events and the device is synchronized before
    reading them; the peak allocated memory is recorded. On CPU ``perf_counter`` times each
    call (``clock="cpu"``: ``thread_time``, the calling thread's CPU time, which ignores time
    spent descheduled on a loaded machine). ``reset()`` runs after every call, outside the timed
    region (e.g. to crop a KV cache). ``now`` (a seconds counter) replaces the clock on CPU:
    tests inject a virtual clock whose costs are known.
    """
    import torch

    cuda = is_cuda(device)
    if cuda and clock != "wall":
        from mpsearch.errors import MpsError

        raise MpsError(f"clock {clock!r} is for CPU timing; CUDA work is timed with CUDA events (clock=wall)")
    if cuda and now is not None:
        from mpsearch.errors import MpsError

        raise MpsError("an injected clock times CPU work; CUDA work is timed with CUDA events")
    now = now or clock_fn(clock)
    for _ in range(warmup):
        fn()
        if reset is not None:
            reset()
    samples: list[float] = []
    peak: int | None = None
    if cuda:
        dev = torch.device(device) if not isinstance(device, torch.nn.Module) else next(device.parameters()).device
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            starts[i].record()
            fn()
            ends[i].record()
            if reset is not None:
                reset()
        torch.cuda.synchronize(dev)
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        peak = int(torch.cuda.max_memory_allocated(dev))
    else:
        for _ in range(repeats):
            t0 = now()
            fn()
            samples.append((now() - t0) * 1e3)
            if reset is not None:
                reset()
    return Timing.from_samples(samples, peak_memory_bytes=peak, threads=torch.get_num_threads())


__all__ = ["Timing", "time_callable", "clock_fn", "fixed_threads", "iqr", "quantile", "is_cuda"]
