"""Does the configured CPU thread count pay off? One forward at that count against one thread.

On small models a thread pool can cost more than the work it shares (waking a second thread
for a 128-wide matmul). :func:`check_threads` times the workload's forward at the configured
count and at one thread and warns, in one line naming both times, when one thread is faster.

Example:
    >>> check = check_threads(model, Workload(threads=2), log=print)   # doctest: +SKIP
    latency: warning: 1 thread runs a prefill in 4.40 ms, the configured 2 threads in 6.52 ms; ...
    >>> check["one_thread_faster"]                                    # doctest: +SKIP
    True
"""
from __future__ import annotations

from typing import Any, Callable

from mpsearch.latency.runner import PhaseRunner, phases
from mpsearch.latency.timing import fixed_threads, is_cuda
from mpsearch.latency.workload import Workload

#: Timed forwards per thread count (interleaved in two rounds, medians compared).
CHECK_REPEATS = 6


def configured_threads(workload: Workload) -> int:
    """The thread count timing runs with: the workload's, else torch's current one."""
    import torch

    return int(workload.threads or torch.get_num_threads())


def check_threads(model: Any, workload: Workload, log: Callable[[str], None] | None = None,
                  repeats: int = CHECK_REPEATS) -> dict[str, Any] | None:
    """Time one forward of the workload's first phase at the configured thread count and at 1.

    Returns ``{"threads", "phase", "configured_ms", "one_thread_ms", "one_thread_faster"}``, or
    None where there is nothing to compare (CUDA, or one thread configured). Warns through
    ``log`` when one thread is faster. Timings alternate between the counts in two rounds so
    that a change of machine load hits both alike.

    Example:
        >>> check_threads(model, Workload(threads=2), log=print)["threads"]   # doctest: +SKIP
        2
    """
    n = configured_threads(workload)
    if n <= 1 or is_cuda(model):
        return None
    phase = phases(workload)[0]
    w = workload.with_(phase=phase, compile=False)
    runner = PhaseRunner(model, w, phase)
    samples: dict[int, list[float]] = {n: [], 1: []}
    half = max(1, repeats // 2)
    for r in range(2):
        for count in (n, 1):
            with fixed_threads(count):
                samples[count].extend(runner.time(half, 1).samples_ms)
    from mpsearch.latency.timing import Timing

    many, one = (Timing.from_samples(samples[c]).median_ms for c in (n, 1))
    out = {"threads": n, "phase": phase, "configured_ms": many, "one_thread_ms": one, "one_thread_faster": one < many}
    if one < many and log is not None:
        log(f"latency: warning: 1 thread runs a {phase} in {one:.2f} ms, the configured {n} threads in {many:.2f} ms: "
            f"the thread pool costs more than it shares on this model; consider --workload threads=1")
    return out


__all__ = ["check_threads", "configured_threads", "CHECK_REPEATS"]
