"""Applying a :class:`mpsearch.policy.Policy` to a model: swaps, reports, memory, the module bank.

The universe of layers is every ``nn.Linear`` of the model (by module path), plus the
:class:`QuantizedLinear` modules mpsearch put in their place (their insides are not layers).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.models import set_module
from mpsearch.formats.base import (
    Format,
    QuantizedLinear,
    _Counter,
    dtype_format,
    get_format,
    module_bytes,
    tensor_storages,
)

LayerSpec = Sequence[Any] | None  # layer names, or objects with ``.name`` (mpsearch.models.Layer)


@dataclass
class _Slot:
    """One Linear position of a model and what sits there now."""

    name: str
    module: nn.Module
    fmt: str
    in_features: int
    out_features: int
    bias: bool
    dtype: torch.dtype

    @property
    def original(self) -> bool:
        return not isinstance(self.module, QuantizedLinear)


def _slot(name: str, m: nn.Module) -> _Slot:
    if isinstance(m, QuantizedLinear):
        return _Slot(name, m, m._mps_format, m.in_features, m.out_features, m.has_bias, m.layer_dtype)
    fmt = dtype_format(m.weight.dtype, f"layer {name!r} ({type(m).__name__})")
    return _Slot(name, m, fmt, m.in_features, m.out_features, m.bias is not None, m.weight.dtype)


def _unswappable_parents() -> tuple[type, ...]:
    """Modules whose Linear children are read directly (``nn.MultiheadAttention``): not layers.

    The same rule as :func:`mpsearch.models.discover_layers`, so both see the same universe.
    """
    from mpsearch.models import UNSWAPPABLE_PARENTS

    return tuple(UNSWAPPABLE_PARENTS)


def _all_slots(model: nn.Module) -> dict[str, _Slot]:
    out: dict[str, _Slot] = {}
    skip: tuple[str, ...] = ()
    parents = _unswappable_parents()
    for name, m in model.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(m, parents):
            skip = skip + (f"{name}." if name else "",)
        elif isinstance(m, (QuantizedLinear, nn.Linear)):
            if name == "":
                raise MpsError("the model is a bare Linear; wrap it in a module (e.g. nn.Sequential) to name the layer")
            out[name] = _slot(name, m)
            skip = skip + (name + ".",)  # a swapped layer's insides are not layers
    return out


def _layer_names(layers: LayerSpec) -> list[str] | None:
    if layers is None:
        return None
    return [str(getattr(x, "name", x)) for x in layers]


def _slots(model: nn.Module, layers: LayerSpec = None) -> dict[str, _Slot]:
    slots = _all_slots(model)
    names = _layer_names(layers)
    if names is None:
        return slots
    _check_known([n for n in names if n not in slots], slots)
    return {n: slots[n] for n in names}


def _check_known(unknown: list[str], slots: dict[str, _Slot]) -> None:
    """Raise naming the first unknown layer, with the nearest real name as a hint."""
    if not unknown:
        return
    near = difflib.get_close_matches(unknown[0], list(slots), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
    raise MpsError(f"unknown layer {unknown[0]!r}{hint}{more}: not a Linear layer of this model "
                   f"({len(slots)} layers; see `mpsearch layers MODEL`)")


def _targets(policy: Any, slots: dict[str, _Slot]) -> dict[str, Format]:
    """Every layer's target format; unknown layers and formats raise (nothing is touched)."""
    _check_known([n for n in getattr(policy, "formats", {}) if n not in slots], slots)
    out = {}
    for name in slots:
        fmt_name = policy.format_for(name)
        try:
            out[name] = get_format(fmt_name)
        except MpsError as exc:
            raise MpsError(f"layer {name!r}: {exc}") from None
    return out


def current_formats(model: nn.Module) -> dict[str, str]:
    """The format every Linear layer is in now (``fp32``/``bf16``/``fp16`` for plain ones).

    Example:
        >>> seq = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> current_formats(seq)
        {'0': 'fp32'}
    """
    return {name: s.fmt for name, s in _all_slots(model).items()}


# -- the report ------------------------------------------------------------------------------
@dataclass
class Change:
    """One swapped layer: its formats and its own tensors' bytes before and after."""

    name: str
    old_format: str
    new_format: str
    bytes_before: int
    bytes_after: int


@dataclass
class AppliedReport:
    """What :func:`apply_policy` (or :meth:`ModuleBank.apply`) changed.

    ``changes``: every swapped layer. ``unchanged``: layers already in their format.
    ``bytes_before`` / ``bytes_after``: the sum over all Linear layers of the model (for a
    :class:`ModuleBank`: over the bank's layers) of each layer's own tensors
    (:func:`module_bytes`), before and after.
    """

    changes: list[Change] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    policy_key: str | None = None
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        w = max([len(c.name) for c in self.changes] + [5])
        lines = [f"{'layer':<{w}}  {'from':<13} {'to':<13} {'bytes before':>13} {'bytes after':>13}"]
        for c in self.changes:
            lines.append(f"{c.name:<{w}}  {c.old_format:<13} {c.new_format:<13} {c.bytes_before:>13,} {c.bytes_after:>13,}")
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 1.0
        lines.append(f"{len(self.changes)} layer(s) changed, {len(self.unchanged)} unchanged; Linear bytes "
                     f"{self.bytes_before:,} -> {self.bytes_after:,} ({ratio:.3f}x)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "policy_key": self.policy_key,
            "changes": [vars(c).copy() for c in self.changes],
            "unchanged": list(self.unchanged),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }


def _swap_all(model: nn.Module, plan: list[tuple[_Slot, nn.Module]]) -> None:
    """Swap every planned module in, or none (roll back on any error)."""
    done: list[_Slot] = []
    try:
        for slot, new in plan:
            set_module(model, slot.name, new)
            done.append(slot)
    except BaseException:
        for slot in reversed(done):
            set_module(model, slot.name, slot.module)
        raise


def _build(fmt: Format, slot: _Slot) -> nn.Module:
    try:
        return fmt.make_module(slot.module)
    except MpsError as exc:
        raise MpsError(f"layer {slot.name!r} -> {fmt.name}: {exc}") from None
    except Exception as exc:  # a backend failure: raise, never leave the layer as it was silently
        raise MpsError(f"layer {slot.name!r} -> {fmt.name}: {type(exc).__name__}: {exc}") from exc


def _check_plan(slots: dict[str, _Slot], targets: dict[str, Format]) -> list[_Slot]:
    """The slots to change; raises for anything that cannot be done (before any swap)."""
    todo = []
    for name, slot in slots.items():
        fmt = targets[name]
        if fmt.name == slot.fmt:
            continue
        if not slot.original:
            raise MpsError(f"layer {name!r} is already {slot.fmt}; re-quantizing a quantized layer to {fmt.name} is "
                           "refused: apply the policy to the full-precision model (or use ModuleBank)")
        try:
            fmt.validate(slot.module, f"layer {name!r}")
        except MpsError as exc:
            raise MpsError(f"layer {name!r} -> {fmt.name}: {exc}") from None
        todo.append(slot)
    return todo


def apply_policy(model: nn.Module, policy: Any, layers: LayerSpec = None) -> AppliedReport:
    """Swap real quantized modules into ``model`` in place, as ``policy`` says.

    Each Linear gets ``policy.format_for(name)``; layers already in that format are left as
    they are (``report.unchanged``). Unknown layer names in the policy's explicit map,
    unknown formats, formats that cannot run on a layer's device or shape, and attempts to
    re-quantize an already quantized layer raise :class:`MpsError` before anything changes;
    a backend failure mid-way rolls every swap back. ``layers`` (names or
    :class:`mpsearch.models.Layer`) limits which layers are considered (default: all).

    Example:
        >>> from mpsearch.policy import Policy
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> report = apply_policy(model, Policy({"0": "rtn.int4"}, default="fp32"))
        >>> [(c.name, c.old_format, c.new_format) for c in report.changes]
        [('0', 'fp32', 'rtn.int4')]
    """
    slots = _slots(model, layers)
    targets = _targets(policy, slots)
    todo = _check_plan(slots, targets)
    plan = [(slot, _build(targets[slot.name], slot)) for slot in todo]
    changes = [Change(s.name, s.fmt, targets[s.name].name, module_bytes(s.module), module_bytes(new)) for s, new in plan]
    bytes_before = sum(module_bytes(s.module) for s in _all_slots(model).values())
    _swap_all(model, plan)
    changed = {c.name for c in changes}
    bytes_after = bytes_before + sum(c.bytes_after - c.bytes_before for c in changes)
    return AppliedReport(changes, [n for n in slots if n not in changed], bytes_before, bytes_after,
                         _key(policy), model)


def _key(policy: Any) -> str | None:
    return policy.key() if hasattr(policy, "key") else None


def policy_memory_bytes(model: nn.Module, policy: Any) -> int:
    """Exact bytes of every tensor of ``model`` were ``policy`` applied to it.

    Non-Linear parameters and buffers at their current sizes, plus each Linear's tensors:
    as they are when it is already in its target format, else the target format's
    ``storage_bytes``. Shared storages (a tied ``lm_head``) are counted once, as
    :func:`module_bytes` counts the real model after :func:`apply_policy`. The search's
    proxy counts memory with the same :class:`MemoryModel`.

    Example:
        >>> from mpsearch.policy import Policy
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))
        >>> policy_memory_bytes(model, Policy({}, default="fp32")), policy_memory_bytes(model, Policy({}, default="bnb.int8"))
        (16384, 4352)
    """
    return MemoryModel(model).total(policy)


class MemoryModel:
    """The exact weight-memory model of one model: what :func:`policy_memory_bytes` computes.

    ``base_bytes``: every distinct storage outside the Linear layers (embeddings, norms, a
    tied head's shared embedding...). :meth:`layer_bytes` ``(name, fmt)``: the bytes a layer
    adds on top of that in ``fmt``: its own storages not already in the base when ``fmt`` is
    its current format (a head tied to the input embeddings adds only its bias), else
    ``Format.storage_bytes`` with the layer's dtype (biases in it). The total of a policy is
    ``base_bytes + sum(layer_bytes)`` exactly, except where two Linear layers share a storage
    (:meth:`shared`): the sum then counts it once per layer left in its format, the total once.

    Example:
        >>> from mpsearch.policy import Policy
        >>> model = torch.nn.Sequential(torch.nn.Embedding(8, 16), torch.nn.Linear(16, 8, bias=False))
        >>> model[1].weight = model[0].weight                       # a tied head
        >>> mm = MemoryModel(model)
        >>> mm.base_bytes, mm.layer_bytes("1", "fp32"), mm.layer_bytes("1", "bnb.int8")
        (512, 0, 160)
        >>> mm.total(Policy({}, default="bnb.int8")) == mm.base_bytes + mm.layer_bytes("1", "bnb.int8")
        True
    """

    def __init__(self, model: nn.Module) -> None:
        self.slots = _all_slots(model)
        inside = {id(m) for s in self.slots.values() for m in s.module.modules()}
        self._keep: list[torch.Tensor] = []  # tensors alive while storage keys are compared
        self._base = tensor_storages((m for m in model.modules() if id(m) not in inside), self._keep)
        self.base_bytes = int(sum(self._base.values()))
        self._own = {n: {k: v for k, v in tensor_storages(s.module.modules(), self._keep).items() if k not in self._base}
                     for n, s in self.slots.items()}

    def format_of(self, name: str) -> str:
        """The format layer ``name`` is in now."""
        return self.slots[name].fmt

    def layer_bytes(self, name: str, fmt: str) -> int:
        """Bytes layer ``name`` adds to :attr:`base_bytes` in format ``fmt`` (see the class docstring)."""
        slot = self.slots[name]
        f = get_format(fmt)
        if f.name == slot.fmt:
            return int(sum(self._own[name].values()))
        return int(f.storage_bytes(slot.in_features, slot.out_features, slot.bias, slot.dtype))

    def shared(self) -> list[tuple[int, list[str]]]:
        """``(bytes, layers)`` of each storage that several Linear layers keep (counted once in the total)."""
        users: dict[tuple[int, int, str], list[str]] = {}
        for n, own in self._own.items():
            for k in own:
                users.setdefault(k, []).append(n)
        return [(int(k[1]), names) for k, names in users.items() if len(names) > 1]

    def total(self, policy: Any) -> int:
        """Exact bytes of the model were ``policy`` applied (:func:`policy_memory_bytes`)."""
        targets = _targets(policy, self.slots)
        counter = _Counter(keep=self._keep)
        total = counter.add(self._base)
        for name, slot in self.slots.items():
            fmt = targets[name]
            if fmt.name == slot.fmt:
                total += counter.add(self._own[name])
            else:
                total += fmt.storage_bytes(slot.in_features, slot.out_features, slot.bias, slot.dtype)
        return total


class ModuleBank:
    """Quantized modules built once per (layer, format) and swapped in per policy.

    For studies that apply many policies to one model: :meth:`apply` never re-quantizes,
    it installs cached modules (built on first use, or all at once with ``eager=True``);
    :meth:`restore` puts the original layers back. The bank keeps the originals, so the
    model must be unquantized when the bank is made.

    Example:
        >>> from mpsearch.policy import Policy
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
        >>> bank = ModuleBank(model, None, ["rtn.int4", "bf16"])
        >>> [c.new_format for c in bank.apply(Policy({"0": "rtn.int4"}, default="bf16")).changes]
        ['rtn.int4', 'bf16']
        >>> bank.restore(); sorted(current_formats(model).values())
        ['fp32', 'fp32']
    """

    def __init__(self, model: nn.Module, layers: Sequence[Any] | None = None, formats: Iterable[str] = (),
                 *, eager: bool = False) -> None:
        self.model = model
        self._slots = _slots(model, layers)
        done = [s for s in self._slots.values() if not s.original]
        if done:
            raise MpsError(f"ModuleBank needs the unquantized model; layer {done[0].name!r} is already {done[0].fmt}")
        self.formats = [get_format(f).name for f in formats]
        for fmt in self.formats:
            for dev in sorted({str(s.module.weight.device) for s in self._slots.values()}):
                get_format(fmt).check_device(dev)
        self._cache: dict[tuple[str, str], tuple[nn.Module, int]] = {}
        self._installed = {n: s.fmt for n, s in self._slots.items()}
        self._original_bytes = {n: module_bytes(s.module) for n, s in self._slots.items()}
        if eager:
            self.prebuild()

    @property
    def layers(self) -> list[str]:
        """The layer names the bank manages."""
        return list(self._slots)

    def prebuild(self) -> None:
        """Build every (layer, format) module now (skipping formats equal to the original)."""
        for name, slot in self._slots.items():
            for fmt in self.formats:
                if fmt != slot.fmt:
                    self.module(name, fmt)

    def module(self, name: str, fmt: str) -> nn.Module:
        """The module for ``name`` in ``fmt``: the original, a cached one, or built now and cached."""
        slot = self._slots[name]
        if fmt == slot.fmt:
            return slot.module
        if fmt not in self.formats:
            raise MpsError(f"layer {name!r}: format {fmt!r} is not in this ModuleBank; its formats: "
                           f"{', '.join(self.formats)} (and each layer's own dtype)")
        key = (name, fmt)
        if key not in self._cache:
            m = _build(get_format(fmt), slot)
            self._cache[key] = (m, module_bytes(m))
        return self._cache[key][0]

    def _bytes(self, name: str, fmt: str) -> int:
        return self._original_bytes[name] if fmt == self._slots[name].fmt else self._cache[(name, fmt)][1]

    def cached_bytes(self) -> int:
        """Bytes held by the bank's built modules (not counting the originals)."""
        return sum(b for _, b in self._cache.values())

    def apply(self, policy: Any) -> AppliedReport:
        """Install the cached modules ``policy`` asks for (building missing ones first).

        Nothing is swapped if any layer cannot take its format. The report lists the layers
        whose installed module changed since the last call.
        """
        targets = _targets(policy, self._slots)
        wanted = {n: f.name for n, f in targets.items()}
        modules = {n: self.module(n, f) for n, f in wanted.items() if f != self._installed[n]}
        plan = [(self._slot_now(n), m) for n, m in modules.items()]
        _swap_all(self.model, plan)
        changes = [Change(n, self._installed[n], wanted[n], self._bytes(n, self._installed[n]), self._bytes(n, wanted[n]))
                   for n in modules]
        before = sum(self._bytes(n, f) for n, f in self._installed.items())
        self._installed.update({n: wanted[n] for n in modules})
        after = sum(self._bytes(n, f) for n, f in self._installed.items())
        unchanged = [n for n in self._slots if n not in modules]
        return AppliedReport(changes, unchanged, before, after, _key(policy), self.model)

    def _slot_now(self, name: str) -> _Slot:
        s = self._slots[name]
        cur = self.module(name, self._installed[name])
        return _Slot(name, cur, self._installed[name], s.in_features, s.out_features, s.bias, s.dtype)

    def restore(self) -> None:
        """Put every original layer back (the cache is kept for the next :meth:`apply`)."""
        plan = [(self._slot_now(n), self._slots[n].module) for n, f in self._installed.items() if f != self._slots[n].fmt]
        _swap_all(self.model, plan)
        self._installed = {n: s.fmt for n, s in self._slots.items()}
