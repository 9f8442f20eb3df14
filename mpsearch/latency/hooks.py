"""Forward hooks on the Linear slots: time every call in context (:class:`LayerClock`), count rows.

Example:
    >>> clock = LayerClock(model, names, cuda=False)     # doctest: +SKIP
    >>> runner.run(); clock.collect()["lm_head"]          # doctest: +SKIP
    0.21
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

from mpsearch.latency.timing import clock_fn


class LayerClock:
    """Forward hooks on the modules in the Linear slots: time (and count rows of) every call.

    On CUDA each call is bracketed by CUDA events; on CPU by ``now`` (a seconds counter; default
    the workload clock named by ``clock``). :meth:`collect` returns ms per layer and resets.
    """

    def __init__(self, model: Any, names: Sequence[str], cuda: bool, recording_rows: bool = False,
                 clock: str = "wall", now: Callable[[], float] | None = None) -> None:
        from mpsearch.models import get_module

        self.cuda = cuda
        self._now = now or clock_fn(clock)
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


def observe_rows(model: Any, names: Sequence[str], runner: Any) -> dict[str, list[int]]:
    """Rows each Linear call sees in one call of ``runner``'s phase (empty list: not called).

    Example:
        >>> observe_rows(model, ["lm_head"], PhaseRunner(model, Workload(), "prefill"))   # doctest: +SKIP
        {'lm_head': [1]}
    """
    import torch

    clock = LayerClock(model, names, cuda=False, recording_rows=True)
    try:
        with torch.inference_mode():
            runner.run()
            runner.reset()
    finally:
        clock.remove()
    return {n: clock.rows.get(n, []) for n in names}


__all__ = ["LayerClock", "observe_rows"]
