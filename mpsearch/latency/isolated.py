"""The isolated method: each unique ``(in, out, bias, rows, format)`` timed alone (used with compile).

Each key is a module built by ``get_format(fmt).make_module(nn.Linear(in, out))`` with random
weights, called on an input of ``(rows, in)``; with ``compile`` it runs the compiled function
of its configuration (:mod:`mpsearch.latency.compiled`), the same one the model's layers get
end to end. ``base`` = the full-precision model minus the sum of its layers' isolated times.

Example:
    >>> r = measure_isolated(model, slots, cands, ref, Workload(compile=True), "prefill", False)  # doctest: +SKIP
"""
from __future__ import annotations

import math
import sys
from typing import Any, Callable, Iterable

from mpsearch.latency.compiled import CompiledLayers, compile_spec, compiled_forward, strict_compile
from mpsearch.latency.hooks import observe_rows
from mpsearch.latency.result import PhaseResult, unique_key
from mpsearch.latency.runner import PhaseRunner
from mpsearch.latency.timing import time_callable
from mpsearch.latency.workload import Workload


def time_unique(key: tuple[Any, ...], dtype: Any, device: Any, workload: Workload) -> float:
    """Time one unique (in, out, bias, rows, format) alone: a fresh module on a random input (ms).

    Example:
        >>> time_unique((64, 64, True, (8,), "fp32"), torch.float32, "cpu", Workload(threads=1)) > 0  # doctest: +SKIP
        True
    """
    import torch
    from torch import nn

    from mpsearch.formats import DTYPE_FORMATS, get_format

    in_f, out_f, bias, rows, fmt = key
    if not rows:
        return 0.0
    lin = nn.Linear(in_f, out_f, bias=bias, device=device, dtype=dtype)
    module = lin if DTYPE_FORMATS.get(dtype) == fmt else get_format(fmt).make_module(lin)
    module.eval()
    spec = compile_spec(workload.compile)
    fn: Callable[[Any], Any] = module
    if spec is not None:
        compiled = compiled_forward(module, spec)
        fn = lambda x: compiled(module, x)  # noqa: E731 - the configuration's shared compiled code
    total = 0.0
    with torch.inference_mode():
        for n_rows in rows:
            x = torch.randn(n_rows, in_f, device=device, dtype=dtype)
            t = time_callable(lambda: fn(x), repeats=workload.repeats, warmup=workload.warmup, device=device,
                              clock=workload.clock)
            total += t.value(workload.stat)
    return total


def measure_isolated(model: Any, slots: dict[str, Any], cands: dict[str, list[str]], ref: dict[str, str],
                     workload: Workload, phase: str, progress: bool) -> PhaseResult:
    """Isolated timing of one phase: each unique key once, then the reference model end to end."""
    names = list(slots)
    rows = observe_rows(model, names, PhaseRunner(model, workload, phase))
    p = next(model.parameters())
    unique: dict[tuple[Any, ...], float] = {}
    for n in names:
        for f in list(cands[n]) + [ref[n]]:
            unique.setdefault(unique_key(slots[n], rows[n], f), math.nan)
    spec = compile_spec(workload.compile)
    compiled = CompiledLayers(model, names, spec) if spec is not None else None
    keys: Iterable[tuple[Any, ...]] = list(unique)
    if progress:
        from tqdm import tqdm

        keys = tqdm(keys, desc=f"latency table ({phase}, unique shapes x formats)", unit="key", file=sys.stderr)
    try:
        with strict_compile(spec) as counts:
            for k in keys:
                unique[k] = time_unique(k, p.dtype, p.device, workload)
            if compiled is not None:
                compiled.install()
            t = PhaseRunner(model, workload, phase).time(workload.repeats, workload.warmup)
    finally:
        if compiled is not None:
            compiled.remove()
    ms = {n: {f: unique[unique_key(slots[n], rows[n], f)] for f in cands[n]} for n in names}
    base = t.value(workload.stat) - sum(unique[unique_key(slots[n], rows[n], ref[n])] for n in names)
    notes = []
    if base < 0:
        notes.append(f"{phase}: base term came out negative ({base:.3f} ms): isolated layers run slower than in the model")
    extra = {"compile": counts} if spec is not None else {}
    return PhaseResult(base, ms, rows, len(unique), workload.repeats + workload.warmup, len(unique), notes, extra)


__all__ = ["measure_isolated", "time_unique"]
