"""``torch.compile`` for timing: each Linear slot compiled once per configuration, reused, counted.

A workload with ``compile`` compiles the model's Linear layers (regional compilation), not the
whole model: one compiled function per *configuration* ``(module class, format, in, out, bias,
dtype, device)``, shared by every layer of that configuration and kept for the whole process,
so the isolated table, end-to-end validation and every refine trial reuse the same compiled
code, and swapping a policy in never recompiles the model. Each configuration gets its own code
object (a renamed copy of one forward), so dynamo's per-function recompile limit counts the
shapes of one configuration only (normally one per phase: prefill rows, decode rows).

Nothing falls back to eager silently: while timing, dynamo's ``fail_on_recompile_limit_hit``
is on and hitting the limit raises :class:`MpsError`; compilations, recompilations (a function
compiled again for a new input shape) and graph breaks are counted from dynamo's counters and
cache entries (:func:`compile_stats`) and recorded with every table and timing.

``compile`` values: ``True`` (inductor, default mode), a mode (``default``, ``reduce-overhead``,
``max-autotune``, ``max-autotune-no-cudagraphs``) or a backend name (``eager``, ``aot_eager``,
``inductor``, ...; ``eager`` runs dynamo's capture without code generation, which the CPU smoke
checks use).

Example:
    >>> spec = compile_spec("eager")
    >>> spec.backend, spec.mode
    ('eager', None)
"""
from __future__ import annotations

import contextlib
import os
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from mpsearch.errors import MpsError

#: Dynamo's per-function recompile limit while timing (its default, 8, is too low once graph
#: breaks make several configurations share an inner function); hitting it raises. Override
#: with the environment variable ``MPSEARCH_RECOMPILE_LIMIT``.
RECOMPILE_LIMIT = int(os.environ.get("MPSEARCH_RECOMPILE_LIMIT", "64"))
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BACKENDS = ("eager", "aot_eager", "inductor", "cudagraphs")


@dataclass(frozen=True)
class CompileSpec:
    """How to compile: a ``torch.compile`` mode (None: default) and backend."""

    mode: str | None = None
    backend: str = "inductor"

    def label(self) -> str:
        """``backend`` or ``backend/mode``."""
        return self.backend if self.mode is None else f"{self.backend}/{self.mode}"


def compile_spec(value: bool | str | None) -> CompileSpec | None:
    """The :class:`CompileSpec` of a workload's ``compile`` field (None: not compiled).

    Example:
        >>> compile_spec(True).label(), compile_spec("max-autotune").label(), compile_spec(False)
        ('inductor', 'inductor/max-autotune', None)
    """
    if value is None or value is False:
        return None
    if value is True or value == "default":
        return CompileSpec()
    if value in MODES:
        return CompileSpec(mode=str(value))
    if value in BACKENDS:
        return CompileSpec(backend=str(value))
    raise MpsError(f"compile={value!r}: not a torch.compile mode ({', '.join(MODES)}) "
                   f"or backend ({', '.join(BACKENDS)})")


# -- one compiled function per configuration ----------------------------------------------
def _forward(mod: Any, x: Any) -> Any:
    return mod.forward(x)


#: (spec, configuration) -> (compiled function, its code object); lives for the process.
_FUNCTIONS: dict[tuple[CompileSpec, tuple[Any, ...]], tuple[Callable[..., Any], Any]] = {}


def configuration(module: Any) -> tuple[Any, ...]:
    """What a compiled Linear is specialised on: class, format, in, out, bias, dtype, device."""
    from mpsearch.formats import DTYPE_FORMATS

    weight = getattr(module, "weight", None)
    dtype = getattr(weight, "dtype", getattr(module, "layer_dtype", None))
    fmt = getattr(module, "_mps_format", None) or DTYPE_FORMATS.get(dtype, str(dtype))
    device = str(getattr(weight, "device", "")) if weight is not None else ""
    if not device:
        p = next(module.parameters(), None)
        device = str(p.device) if p is not None else "cpu"
    bias = getattr(module, "has_bias", None)
    if bias is None:
        bias = getattr(module, "bias", None) is not None
    return (type(module).__qualname__, fmt, int(module.in_features), int(module.out_features), bool(bias),
            str(dtype), device)


def compiled_forward(module: Any, spec: CompileSpec) -> Callable[..., Any]:
    """The compiled ``f(module, x)`` of ``module``'s configuration (made on first use, then reused).

    Example:
        >>> import torch
        >>> f = compiled_forward(torch.nn.Linear(4, 4), CompileSpec(backend="eager"))
        >>> f is compiled_forward(torch.nn.Linear(4, 4), CompileSpec(backend="eager"))
        True
    """
    import torch

    key = (spec, configuration(module))
    hit = _FUNCTIONS.get(key)
    if hit is None:
        name = f"mps_linear_{len(_FUNCTIONS)}"
        fn = types.FunctionType(_forward.__code__.replace(co_name=name), _forward.__globals__, name)
        try:
            compiled = torch.compile(fn, mode=spec.mode, backend=spec.backend, dynamic=False)
        except Exception as exc:  # noqa: BLE001 - report what torch.compile refused, in one line
            raise MpsError(f"torch.compile ({spec.label()}) failed: {str(exc).splitlines()[0]}") from None
        hit = _FUNCTIONS[key] = (compiled, fn.__code__)
    return hit[0]


class CompiledLayers:
    """Installs the compiled forward on the modules now in the named Linear slots; ``remove()`` undoes it.

    A module's ``_compiled_call_impl`` is what ``nn.Module.compile`` sets: calling the module
    then runs the compiled function (forward hooks are not run, as with ``module.compile()``).
    Call :meth:`install` again after swapping modules (a :class:`ModuleBank` apply).

    Example:
        >>> layers = CompiledLayers(model, names, compile_spec(True))   # doctest: +SKIP
        >>> layers.install(); runner.time(10, 2); layers.remove()       # doctest: +SKIP
    """

    def __init__(self, model: Any, names: Sequence[str], spec: CompileSpec) -> None:
        self.model = model
        self.names = list(names)
        self.spec = spec
        self._installed: list[Any] = []

    def install(self) -> None:
        """Compile (or reuse) and install every slot's current module."""
        from mpsearch.models import get_module

        for n in self.names:
            m = get_module(self.model, n)
            if getattr(m, "_compiled_call_impl", None) is None:
                fn = compiled_forward(m, self.spec)
                m._compiled_call_impl = _bound(fn, m)
                self._installed.append(m)

    def remove(self) -> None:
        """Put every module this object compiled back to eager calls."""
        for m in self._installed:
            m._compiled_call_impl = None
        self._installed.clear()


def _bound(fn: Callable[..., Any], module: Any) -> Callable[..., Any]:
    # Compiled code always sees (rows, in): an isolated key and the layer in the model share one
    # compiled variant whatever the model's leading dimensions (views, no copies).
    def call(x: Any) -> Any:
        if x.dim() == 2:
            return fn(module, x)
        y = fn(module, x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return call


# -- counting and strictness --------------------------------------------------------------
def _cache_entries(code: Any) -> int:
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(code))
    except Exception:  # noqa: BLE001 - a torch without the debug hook: counters only
        return 0


def compile_stats() -> dict[str, Any]:
    """Dynamo's totals in this process, and mpsearch's compiled configurations.

    ``compilations``: frames dynamo compiled; ``graph_breaks``: graph breaks (code run eager
    between graphs); ``configurations``: compiled Linear configurations; ``variants``: their
    compiled variants (one per input shape); ``recompilations``: variants beyond the first.
    """
    from torch._dynamo.utils import counters

    variants = [_cache_entries(code) for _, code in _FUNCTIONS.values()]
    return {
        "compilations": int(counters["frames"].get("ok", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "configurations": len(_FUNCTIONS),
        "variants": int(sum(variants)),
        "recompilations": int(sum(max(0, v - 1) for v in variants)),
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
    }


def stats_delta(before: dict[str, Any], after: dict[str, Any] | None = None) -> dict[str, Any]:
    """``after - before`` for every count of :func:`compile_stats`."""
    after = after if after is not None else compile_stats()
    return {k: after[k] - before.get(k, 0) for k in after}


@contextlib.contextmanager
def strict_compile(spec: CompileSpec | None) -> Iterator[dict[str, Any]]:
    """Time compiled code with no silent eager fallback; yields the counts of the block (filled at exit).

    Dynamo's recompile limit is :data:`RECOMPILE_LIMIT` in the block; hitting it raises
    :class:`MpsError` instead of running eager.
    """
    out: dict[str, Any] = {}
    if spec is None:
        yield out
        return
    import torch._dynamo

    before = compile_stats()
    limit = RECOMPILE_LIMIT
    accumulated = max(torch._dynamo.config.accumulated_recompile_limit, 16 * limit)
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=limit,
                                        accumulated_recompile_limit=accumulated):
            yield out
    except torch._dynamo.exc.FailOnRecompileLimitHit as exc:
        raise MpsError(f"torch.compile ({spec.label()}) hit its recompile limit ({limit}) while timing: the "
                       "timing would have run eager code as if compiled, so it is refused; a layer saw more "
                       "input shapes than expected (TORCH_LOGS=recompiles names them)") from exc
    finally:
        out.update(stats_delta(before))
        out["backend"] = spec.label()


__all__ = ["CompileSpec", "compile_spec", "compiled_forward", "CompiledLayers", "compile_stats", "stats_delta",
           "strict_compile", "configuration", "MODES", "BACKENDS", "RECOMPILE_LIMIT"]
