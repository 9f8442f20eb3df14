"""Search spaces: which formats each layer may take (DESIGN.md, "Search spaces").

A space lists candidate formats per layer group (vision / projector / language / head), pins
(glob -> format, never searched) and ties (leaf names that take one decision per block, e.g.
q/k/v of one attention block). ``decisions(layers)`` turns a model's layers into the
independent choices a search makes.

Example:
    >>> space = SearchSpace.from_yaml("cpu")          # the shipped search_spaces/cpu.yaml
    >>> space.groups["language"][:2]
    ['fp32', 'torch.int8dyn']
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from mpsearch._yaml import load_yaml
from mpsearch.errors import ArtifactError, MpsError
from mpsearch.models.groups import GROUPS  # the one place for the group names

SPACES_DIR = Path(__file__).parent / "search_spaces"


@dataclass(frozen=True)
class Decision:
    """One searchable choice: the layers it sets (a tie group sets several) and its formats.

    ``choices`` are in the space's order; a pinned layer is a decision with one choice.
    """

    key: str
    layers: tuple[str, ...]
    choices: tuple[str, ...]
    group: str

    @property
    def fixed(self) -> bool:
        """True when there is nothing to choose (a pin, or a single candidate)."""
        return len(self.choices) == 1


@dataclass
class SearchSpace:
    """Candidate formats per group, pins and ties.

    Example:
        >>> s = SearchSpace("x", {"vision": ["fp32"], "projector": ["fp32"],
        ...                       "language": ["fp32", "torch.int8dyn"], "head": ["fp32"]})
        >>> s.formats()
        ['fp32', 'torch.int8dyn']
    """

    name: str
    groups: dict[str, list[str]]
    pin: dict[str, str] = field(default_factory=dict)
    tie: list[list[str]] | str = field(default_factory=list)
    device: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        from mpsearch.schemas import SearchSpaceSpec, validate_object

        validate_object(SearchSpaceSpec, {"groups": self.groups, "pin": self.pin, "tie": self.tie},
                        f"search space {self.name!r}")
        if self.device is not None:
            self.check_device(self.device)

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path_or_name: str | Path, device: str | None = None) -> "SearchSpace":
        """Load a space from a YAML file, or a shipped one by name (``cpu``, ``gpu-bnb``, ...).

        ``device`` ("cpu"/"cuda"), when given, refuses a space naming a format that cannot run
        there. Unknown keys and formats raise :class:`ArtifactError` naming file and line.
        """
        path = Path(path_or_name)
        if not path.is_file():
            shipped = SPACES_DIR / f"{path_or_name}.yaml"
            if shipped.is_file():
                path = shipped
            else:
                names = ", ".join(shipped_spaces())
                raise MpsError(f"search space {str(path_or_name)!r}: no such file, and not a shipped space ({names})")
        from mpsearch.schemas import SearchSpaceFile, validate

        data, lines = load_yaml(path)
        validate(SearchSpaceFile, data, path, lines)
        groups = data["groups"]
        pin = data.get("pin") or {}
        tie = data.get("tie") or []
        try:
            return cls(
                name=str(data.get("name") or path.stem),
                groups={str(g): [str(f) for f in fs] for g, fs in groups.items()},
                pin={str(k): str(v) for k, v in pin.items()},
                tie=tie,
                device=device or data.get("device"),
                description=str(data.get("description") or ""),
            )
        except MpsError as exc:
            raise ArtifactError(f"{path}: {exc}") from None

    # -- queries ------------------------------------------------------------------------
    def formats(self) -> list[str]:
        """Every format the space names (groups and pins), in first-seen order."""
        seen: list[str] = []
        for fmts in list(self.groups.values()) + [[f] for f in self.pin.values()]:
            for f in fmts:
                if f not in seen:
                    seen.append(f)
        return seen

    def check_device(self, device: str) -> None:
        """Raise :class:`MpsError` if a format of the space cannot run on ``device``."""
        from mpsearch.formats import get_format

        dev = str(device).split(":")[0]
        bad = [f for f in self.formats() if dev not in get_format(f).devices]
        if bad:
            raise MpsError(
                f"search space {self.name!r} names format(s) {bad} that cannot run on {dev}; "
                f"use a space for {dev} (shipped: {', '.join(shipped_spaces())})"
            )

    def pinned(self, layer_name: str) -> str | None:
        """The pinned format of a layer, or None (first matching glob wins)."""
        for pattern, fmt in self.pin.items():
            if fnmatch.fnmatchcase(layer_name, pattern):
                return fmt
        return None

    def candidates(self, layer: Any) -> list[str]:
        """The formats ``layer`` may take (a :class:`mpsearch.models.Layer`), pins applied."""
        fixed = self.pinned(layer.name)
        if fixed is not None:
            return [fixed]
        if layer.group not in self.groups:
            raise MpsError(
                f"search space {self.name!r} has no formats for group {layer.group!r} (layer {layer.name}); "
                f"it lists: {', '.join(self.groups)}"
            )
        return list(self.groups[layer.group])

    def decisions(self, layers: Sequence[Any]) -> list[Decision]:
        """The independent choices for ``layers``: one per layer, one per tie group.

        A tie group's choices are the formats every member may take (in the first member's
        order); pinned layers leave their tie group and are single-choice decisions.
        """
        tie_key = self._tie_keys(layers)
        out: list[Decision] = []
        index: dict[str, int] = {}
        for layer in layers:
            cands = self.candidates(layer)
            key = tie_key.get(layer.name) if self.pinned(layer.name) is None else None
            if key is None:
                out.append(Decision(layer.name, (layer.name,), tuple(cands), layer.group))
                continue
            if key in index:
                d = out[index[key]]
                choices = tuple(c for c in d.choices if c in cands)
                if not choices:
                    raise MpsError(f"search space {self.name!r}: tie group {key} has no format all its layers may take")
                out[index[key]] = Decision(key, d.layers + (layer.name,), choices, d.group)
            else:
                index[key] = len(out)
                out.append(Decision(key, (layer.name,), tuple(cands), layer.group))
        return out

    def searchable(self, layers: Sequence[Any]) -> list[Decision]:
        """Decisions with more than one choice; raises if the space leaves nothing to search."""
        free = [d for d in self.decisions(layers) if not d.fixed]
        if not free:
            raise MpsError(
                f"search space {self.name!r} leaves nothing to search on this model: every one of its "
                f"{len(layers)} layers is pinned or has a single candidate; add formats to 'groups' or remove pins"
            )
        return free

    # -- policies -----------------------------------------------------------------------
    @property
    def default_format(self) -> str:
        """The ``default`` of every policy made from this space (its first format).

        Every layer is listed explicitly too; one default for all of them gives one
        ``Policy.key()`` per assignment, whoever made the policy (uniform, sampled, searched).
        """
        fmts = self.formats()
        return fmts[0] if fmts else "bf16"

    def uniform_policies(self, layers: Sequence[Any]) -> list[Any]:
        """One policy per format of the space: that format wherever a decision may take it.

        Decisions (tie groups, pinned layers) that cannot take the format keep their first
        choice; formats no layer may take and policies equal to an earlier one are left out.
        Each lists every layer, has ``default`` :attr:`default_format` and
        ``meta = {"label": "uniform <fmt>", "format": fmt}``.

        Example:
            >>> from mpsearch.models import Layer
            >>> s = SearchSpace("x", {"language": ["fp32", "torch.int8dyn"], "head": ["fp32"]})
            >>> ls = [Layer("fc", "language", 8, 8, False), Layer("lm_head", "head", 8, 16, False)]
            >>> [(p.label, p.formats["fc"], p.formats["lm_head"]) for p in s.uniform_policies(ls)]
            [('uniform fp32', 'fp32', 'fp32'), ('uniform torch.int8dyn', 'torch.int8dyn', 'fp32')]
        """
        decisions = self.decisions(list(layers))
        names = [l.name for l in layers]
        out, seen = [], set()
        for fmt in self.formats():
            if not any(fmt in d.choices for d in decisions):
                continue
            policy = self._policy(decisions, names, [fmt if fmt in d.choices else d.choices[0] for d in decisions],
                                  label=f"uniform {fmt}", format=fmt)
            if policy.key() not in seen:
                seen.add(policy.key())
                out.append(policy)
        return out

    def sample(self, layers: Sequence[Any], k: int, seed: int = 0) -> list[Any]:
        """``k`` random policies: each decision a uniform draw among its choices (ties and pins kept).

        Drawn with ``random.Random(seed)``, decision by decision: the same ``(layers, k, seed)``
        give the same policies, and a larger ``k`` extends the list. Labels ``random <i>``;
        ``default`` is :attr:`default_format`, as for :meth:`uniform_policies`.

        Example:
            >>> from mpsearch.models import Layer
            >>> s = SearchSpace("x", {"language": ["fp32", "torch.int8dyn"]})
            >>> ps = s.sample([Layer("a", "language", 8, 8, False), Layer("b", "language", 8, 8, False)], 3, seed=0)
            >>> [p.label for p in ps], ps[0].key() == s.sample([Layer("a", "language", 8, 8, False),
            ...                                                Layer("b", "language", 8, 8, False)], 1, seed=0)[0].key()
            (['random 0', 'random 1', 'random 2'], True)
        """
        import random

        decisions = self.decisions(list(layers))
        names = [l.name for l in layers]
        rng = random.Random(seed)
        return [self._policy(decisions, names, [d.choices[0] if d.fixed else rng.choice(d.choices) for d in decisions],
                             label=f"random {i}") for i in range(int(k))]

    def _policy(self, decisions: Sequence[Decision], names: Sequence[str], choice: Sequence[str], **meta: Any) -> Any:
        from mpsearch.policy import Policy

        formats = {n: f for d, f in zip(decisions, choice) for n in d.layers}
        return Policy({n: formats[n] for n in names}, default=self.default_format, meta=dict(meta))

    def _tie_keys(self, layers: Sequence[Any]) -> dict[str, str]:
        if self.tie == "auto":
            return {l.name: l.tie for l in layers if getattr(l, "tie", None)}
        keys: dict[str, str] = {}
        for members in self.tie:  # type: ignore[union-attr]
            label = "+".join(members)
            for layer in layers:
                parent, _, leaf = layer.name.rpartition(".")
                if leaf in members:
                    keys[layer.name] = f"{parent}.{{{label}}}"
        # a "group" of one layer is no tie
        counts: dict[str, int] = {}
        for k in keys.values():
            counts[k] = counts.get(k, 0) + 1
        return {n: k for n, k in keys.items() if counts[k] > 1}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for provenance and cache keys)."""
        return {"name": self.name, "groups": self.groups, "pin": self.pin, "tie": self.tie, "device": self.device}


def shipped_spaces() -> list[str]:
    """Names of the search spaces shipped with the package."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
