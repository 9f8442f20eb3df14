"""Strict schemas of every artifact mpsearch reads, and the one-line errors they give.

One pydantic model per artifact, declared here once and used by its loader:

=====================  ===============================  =========================================
artifact               schema                           loader
=====================  ===============================  =========================================
precision map (YAML)   :class:`PrecisionMapFile`        ``Policy.from_yaml``
search space (YAML)    :class:`SearchSpaceFile`         ``SearchSpace.from_yaml`` (and ``SearchSpace(...)``)
run config (YAML)      :class:`RunConfigFile`           ``RunConfig.from_yaml`` / ``RunConfig.validate``
workload               :class:`WorkloadSchema`          ``Workload(...)``, inside run configs and maps
sensitivity report     :class:`SensitivityFile`         ``SensitivityReport.from_json`` (values: :class:`SensitivityValues`)
latency table          :class:`LatencyTableFile`        ``LatencyTable.from_json`` (values: :class:`LatencyValues`)
front, refined front   :class:`FrontFile`               ``read_front``
results line (JSONL)   :class:`ResultRecord`            ``read_results``
stages file            :class:`StagesFile`              ``Manifest`` (``mpsearch run``'s ``stages.json``)
=====================  ===============================  =========================================

Every model forbids unknown fields (``extra="forbid"``) and is strict about types (a string is
not a number, ``true`` is not an integer). Only the free-form bags (``meta``, ``provenance``,
``metrics``, a front's ``failures`` reasons) take keys the schema does not name; where such a
bag has known keys (``meta.groups``, ``meta.dead``) those are checked too.

Values are checked, not only types: scores and per-layer latencies are finite and >= 0, formats
are known to the registry (:data:`mpsearch.formats.FORMATS`), groups are among ``vision``,
``projector``, ``language``, ``head``, layer names are non-empty strings, schema versions are
the supported ones, and a report's ``meta.groups`` maps every layer it scores.

:func:`validate` turns a :class:`pydantic.ValidationError` into one :class:`ArtifactError` line
naming the file, the line (YAML, and JSON files written with one key per line), the field path
and what would be valid, e.g.::

    run.yaml:7: unknown field 'phae' in workload; valid: batch, image_size, prompt_tokens, ...
    sens.json:12: field scores['model.layers.0.fc1']['bnb.nf4'] must be a finite number >= 0, got nan

Example:
    >>> from mpsearch.schemas import LatencyValues, validate_object
    >>> validate_object(LatencyValues, {"base_ms": 1.0, "ms": {"a": {"fp32": -1.0}}}, "LatencyTable")
    Traceback (most recent call last):
    ...
    mpsearch.errors.ArtifactError: LatencyTable: field ms['a']['fp32'] must be a finite number >= 0, got -1.0
"""
from __future__ import annotations

import json
import math
import numbers
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping, Optional, TypeVar, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from mpsearch.errors import ArtifactError

__all__ = [
    "GROUPS", "SCHEMA_VERSION", "PRECISION_MAP_SCHEMA", "RUN_SCHEMA",
    "PrecisionMapFile", "PolicyRule", "PolicyDict", "SearchSpaceFile", "SearchSpaceSpec", "WorkloadSchema",
    "WorkloadRecord", "RunConfigSchema", "RunConfigFile", "SensitivityValues", "SensitivityFile",
    "LatencyValues", "LatencyTableFile", "CandidateRecord", "FrontFile", "ResultBody", "ResultRecord",
    "StageRecord", "StagesFile", "validate", "validate_object", "read_json_artifact", "json_lines",
]

#: Schema version of the JSON artifacts (``"schema": 1``); see :mod:`mpsearch.artifacts`.
SCHEMA_VERSION = 1
#: ``mpsearch: 1`` in precision maps.
PRECISION_MAP_SCHEMA = 1
#: ``mpsearch_run: 1`` in run configs.
RUN_SCHEMA = 1
from mpsearch.models.groups import GROUPS  # noqa: E402 - the one place for the group names
PHASES = ("prefill", "decode", "both")
STATS = ("median", "min")
CLOCKS = ("wall", "cpu")
SAMPLERS = ("nsga2", "tpe", "gp", "evo")
METHODS = ("hessian", "fisher", "activation", "kl")
MODES = ("logits", "generate")
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "auto")

M = TypeVar("M", bound=BaseModel)


def _fail(message: str) -> PydanticCustomError:
    """A validation error whose message is used as written (see :func:`_describe`)."""
    return PydanticCustomError("mps", message)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- value types
def _known_format(name: str) -> str:
    from mpsearch.formats import FORMATS

    if name not in FORMATS:
        raise _fail(f"unknown format {name!r}; valid: {', '.join(FORMATS)}")
    return name


def _number(value: Any, expected: str) -> float:
    """A real number (not a bool, not a string) as a float; anything else is refused."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise _fail(f"must be {expected}, got {_short(value)} (non-numeric)")
    if isinstance(value, numbers.Real):
        return float(value)
    try:  # numpy / torch scalars handed over from Python
        return float(value)
    except (TypeError, ValueError):
        raise _fail(f"must be {expected}, got {_short(value)} (non-numeric)") from None


def _non_negative_finite(value: Any) -> float:
    x = _number(value, "a finite number >= 0")
    if not math.isfinite(x) or x < 0:
        raise _fail(f"must be a finite number >= 0, got {x!r}")
    return x


def _finite(value: Any) -> float:
    x = _number(value, "a finite number")
    if not math.isfinite(x):
        raise _fail(f"must be a finite number, got {x!r}")
    return x


def _unknown_or_non_negative(value: Any) -> float:
    """A non-negative finite number, or NaN (how fronts write an unknown proxy loss)."""
    x = _number(value, "a finite number >= 0 (or NaN: unknown)")
    if math.isnan(x):
        return x
    if math.isinf(x) or x < 0:
        raise _fail(f"must be a finite number >= 0 (or NaN: unknown), got {x!r}")
    return x


def _share(value: Any) -> float:
    x = _number(value, "a number in [0, 1]")
    if not (math.isfinite(x) and 0.0 <= x <= 1.0):
        raise _fail(f"must be a number in [0, 1], got {x!r}")
    return x


def _device(value: str) -> str:
    if not re.fullmatch(r"(cpu|cuda)(:\d+)?", value):
        raise _fail(f"is {value!r}; valid: cpu, cuda, cuda:N")
    return value


#: A layer name (module path) or any other required name: a non-empty string.
Name = Annotated[str, Field(min_length=1)]
#: A format of the registry (``mpsearch.formats.FORMATS``).
FormatName = Annotated[str, AfterValidator(_known_format)]
#: Layer group.
Group = Literal["vision", "projector", "language", "head"]
#: A sensitivity score or a per-layer latency: finite and >= 0.
Score = Annotated[float, BeforeValidator(_non_negative_finite)]
#: Milliseconds of one layer: finite and >= 0.
Millis = Annotated[float, BeforeValidator(_non_negative_finite)]
#: Any finite number (``base_ms``, a predicted latency: an additive fit can put them below 0).
Finite = Annotated[float, BeforeValidator(_finite)]
#: A proxy loss: finite and >= 0, or NaN when unknown.
Loss = Annotated[float, BeforeValidator(_unknown_or_non_negative)]
#: A share in [0, 1] (accuracy, flips).
Share = Annotated[float, BeforeValidator(_share)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
Device = Annotated[str, AfterValidator(_device)]


class _Strict(BaseModel):
    """Base of every schema: unknown fields refused, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False)
    #: What the whole document must be when it is not a mapping (the error's first words).
    NOT_MAPPING: ClassVar[str] = "expected a mapping"


class _Bag(BaseModel):
    """A free-form mapping (``meta``) whose known keys are checked; other keys are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True)


# --------------------------------------------------------------------------- JSON headers
class _JsonArtifact(_Strict):
    """``kind`` and ``schema`` of a JSON artifact (checked first: a foreign file says so)."""

    KIND: ClassVar[str] = ""
    NOT_MAPPING: ClassVar[str] = "expected a JSON object"

    kind: Any = Field(None, validate_default=True)
    schema_: Any = Field(None, alias="schema", validate_default=True)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: Any) -> Any:
        if v != cls.KIND:
            raise _fail(f"is {v!r}, expected {cls.KIND!r} (is this the right file?)")
        return v

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v: Any) -> Any:
        if isinstance(v, bool) or v != SCHEMA_VERSION:
            raise _fail(f"is {v!r}; this mpsearch reads schema {SCHEMA_VERSION} only")
        return v


# --------------------------------------------------------------------------- workload
def _compile(value: Any) -> Any:
    if isinstance(value, bool) or (isinstance(value, str) and value):
        return value
    raise _fail(f"must be true/false or a torch.compile mode, got {_short(value)}")


class WorkloadSchema(_Strict):
    """The fields of :class:`mpsearch.latency.Workload` (defaults equal to the dataclass's)."""

    NOT_MAPPING: ClassVar[str] = "a workload is a mapping of batch, phase, prompt_tokens, ..."

    batch: PosInt = 1
    image_size: Optional[PosInt] = None
    prompt_tokens: Optional[PosInt] = None
    new_tokens: NonNegInt = 0
    phase: Literal["prefill", "decode", "both"] = "prefill"
    compile: Annotated[Any, AfterValidator(_compile)] = False
    threads: Optional[PosInt] = None
    repeats: PosInt = 30
    warmup: NonNegInt = 5
    stat: Literal["median", "min"] = "median"
    clock: Literal["wall", "cpu"] = "wall"

    @model_validator(mode="after")
    def _together(self) -> "WorkloadSchema":
        if self.phase == "both" and self.new_tokens < 1:
            raise _fail("phase 'both' needs new_tokens >= 1 (decode steps after the first token)")
        if self.clock == "cpu" and self.threads != 1:
            raise _fail("clock=cpu times one thread's CPU time: set threads=1 with it")
        return self


class WorkloadRecord(WorkloadSchema):
    """A workload as artifacts record it (``Workload.to_dict()``): the inputs only described."""

    inputs: Optional[dict[str, Any]] = None
    processor: Optional[str] = None


# --------------------------------------------------------------------------- precision map
class PolicyRule(_Strict):
    """One first-match rule of a hand-written map."""

    match: Annotated[Name, Field(description="be a glob string")]
    format: FormatName


class PrecisionMapFile(_Strict):
    """The precision-map YAML (DESIGN.md, "The precision map")."""

    NOT_MAPPING: ClassVar[str] = "a precision map is a YAML mapping with 'mpsearch', 'default' and 'layers'"

    mpsearch: Any = Field(None, validate_default=True)
    model: Optional[str] = None
    revision: Optional[str] = None
    device: Optional[str] = None
    workload: Optional[WorkloadRecord] = None
    default: FormatName = "bf16"
    layers: Annotated[Optional[dict[Name, FormatName]], Field(description="map module paths to formats")] = None
    rules: Annotated[Optional[list[PolicyRule]], Field(description="be a list of {match, format}")] = None
    metrics: Optional[dict[str, Any]] = None
    provenance: Optional[dict[str, Any]] = None

    @field_validator("mpsearch")
    @classmethod
    def _version(cls, v: Any) -> Any:
        if isinstance(v, bool) or v != PRECISION_MAP_SCHEMA:
            raise _fail(f"(schema version) is {v!r}; this mpsearch reads version {PRECISION_MAP_SCHEMA}")
        return v


class PolicyDict(_Strict):
    """A policy inlined in a front or a results line (``Policy.to_dict()``)."""

    default: FormatName = "bf16"
    layers: Annotated[dict[Name, FormatName], Field(description="map module paths to formats")] = {}
    rules: list[PolicyRule] = []
    meta: dict[str, Any] = {}


# --------------------------------------------------------------------------- search space
def _tie(value: Any) -> Any:
    if value == "auto":
        return value
    if not isinstance(value, list):
        raise _fail(f"must be a list of lists of leaf names, or 'auto'; got {_short(value)}")
    for i, members in enumerate(value):
        if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
            raise _fail(f"must be a list of lists of leaf names, or 'auto'; tie[{i}] is {_short(members)}")
    return value


Tie = Annotated[Any, AfterValidator(_tie)]


class SearchSpaceSpec(_Strict):
    """What a :class:`mpsearch.space.SearchSpace` holds (checked when one is made in Python too)."""

    groups: Annotated[dict[Group, Annotated[list[FormatName], Field(min_length=1)]],
                      Field(description="map groups (vision, projector, language, head) to format lists")]
    pin: Annotated[dict[Name, FormatName], Field(description="map globs to formats")] = {}
    tie: Tie = []


class SearchSpaceFile(SearchSpaceSpec):
    """A search-space YAML (DESIGN.md, "Search spaces")."""

    NOT_MAPPING: ClassVar[str] = "a search space is a mapping with 'name' and 'groups'"

    name: Optional[str] = None
    description: Optional[str] = None
    device: Optional[Device] = None
    groups: Annotated[dict[Group, Annotated[list[FormatName], Field(min_length=1)]],
                      Field(min_length=1, description="map groups (vision, projector, language, head) to format lists")]
    pin: Annotated[Optional[dict[Name, FormatName]], Field(description="map globs to formats")] = None
    tie: Optional[Tie] = None


# --------------------------------------------------------------------------- run config
def _budget(value: Any) -> Any:
    if value is None or value == "auto":
        return value
    if isinstance(value, str) and value.startswith("auto:"):
        try:
            bits = float(value[5:])
        except ValueError:
            bits = float("nan")
        if not math.isfinite(bits) or bits <= 0:
            raise _fail(f"'auto:<bits>' needs a positive number of bits per weight, got {_short(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _fail(f"must be a positive number, 'auto', 'auto:<bits>' (budget_mb) or null, got {_short(value)}")
    return value


Budget = Annotated[Any, AfterValidator(_budget)]


class RunConfigSchema(_Strict):
    """The fields of :class:`mpsearch.pipeline.RunConfig` (defaults equal to the dataclass's)."""

    NOT_MAPPING: ClassVar[str] = "a run config is a YAML mapping (see examples/)"

    model: Name = "demo"
    revision: Optional[str] = None
    device: Device = "cpu"
    dtype: Optional[Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "auto"]] = None
    trust_remote_code: bool = False
    benchmark: Name = "synthetic"
    split: Name = "validation"
    data: Optional[Name] = None
    subjects: Optional[list[Name]] = None
    limit: Optional[PosInt] = None
    mode: Literal["logits", "generate"] = "logits"
    max_new_tokens: PosInt = 16
    calib_split: Name = "dev"
    calib_samples: PosInt = 32
    batch_size: PosInt = 16
    space: Name = "cpu"
    method: Literal["hessian", "fisher", "activation", "kl"] = "fisher"
    n_probes: PosInt = 8
    workload: WorkloadSchema = WorkloadSchema(batch=1, phase="prefill")
    budget_ms: Budget = None
    budget_mb: Budget = "auto:2.5"
    search_trials: NonNegInt = 600
    sampler: Literal["nsga2", "tpe", "gp", "evo"] = "evo"
    refine_trials: NonNegInt = 16
    top_k: NonNegInt = 4
    baselines: Literal["relevant", "all"] = "relevant"
    seed: NonNegInt = 0
    storage: Optional[Name] = None
    out: Name = "runs/demo"

    @model_validator(mode="after")
    def _one_budget(self) -> "RunConfigSchema":
        if isinstance(self.budget_ms, str) and self.budget_ms.startswith("auto:"):
            raise _fail("budget_ms: 'auto:<bits>' is a memory budget (budget_mb); budget_ms takes a number or 'auto'")
        if self.budget_ms is None and self.budget_mb is None:
            raise _fail("set at least one of 'budget_ms' and 'budget_mb' (a number or 'auto')")
        return self


class RunConfigFile(RunConfigSchema):
    """A run-config YAML: the :class:`RunConfigSchema` fields and ``mpsearch_run: 1``."""

    mpsearch_run: Any = Field(None, validate_default=True)

    @field_validator("mpsearch_run")
    @classmethod
    def _version(cls, v: Any) -> Any:
        if isinstance(v, bool) or v != RUN_SCHEMA:
            raise _fail(f"(schema version) is {v!r}; this mpsearch reads version {RUN_SCHEMA}")
        return v


# --------------------------------------------------------------------------- sensitivity report
class SensitivityMeta(_Bag):
    """The known keys of a report's ``meta`` (others are kept as written)."""

    groups: Optional[dict[Name, Group]] = None
    depths: Optional[dict[Name, Optional[int]]] = None
    dead: Optional[list[Name]] = None
    negative_trace: Optional[list[Name]] = None
    model: Optional[str] = None


def _groups_cover(scores: Mapping[str, Any], meta: Optional[SensitivityMeta]) -> None:
    groups = meta.groups if meta is not None else None
    if groups is None:
        return
    missing = [n for n in scores if n not in groups]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise _fail(f"meta.groups must map every scored layer to its group; it has none for {missing[0]!r}{more}")


class SensitivityValues(_Strict):
    """What a :class:`mpsearch.sensitivity.SensitivityReport` holds (checked when one is made in Python)."""

    scores: Annotated[dict[Name, Annotated[dict[Name, Score], Field(description="map formats to scores")]],
                      Field(description="map layers to {format: score}")]
    meta: Optional[SensitivityMeta] = None

    @model_validator(mode="after")
    def _cover(self) -> "SensitivityValues":
        _groups_cover(self.scores, self.meta)
        return self


class SensitivityFile(_JsonArtifact):
    """A sensitivity report JSON (``kind: "sensitivity"``)."""

    KIND: ClassVar[str] = "sensitivity"

    method: Optional[str] = None
    scores: Annotated[dict[Name, Annotated[dict[FormatName, Score], Field(description="map formats to scores")]],
                      Field(description="map layers to {format: score}")]
    meta: Optional[SensitivityMeta] = None
    provenance: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _cover(self) -> "SensitivityFile":
        _groups_cover(self.scores, self.meta)
        return self


# --------------------------------------------------------------------------- latency table
Row = Annotated[dict[Name, Millis], Field(min_length=1, description="map formats to milliseconds")]


class LatencyMeta(_Bag):
    """The known keys of a table's ``meta`` (others are kept as written)."""

    device: Optional[str] = None
    model: Optional[str] = None
    layer_groups: Optional[dict[Name, Group]] = None
    cache_key: Optional[dict[str, Any]] = None


class LatencyValues(_Strict):
    """What a :class:`mpsearch.latency.LatencyTable` holds (checked when one is made in Python)."""

    base_ms: Finite
    ms: Annotated[dict[Name, Row], Field(description="map layer names to {format: ms}")]


class LatencyTableFile(_JsonArtifact):
    """A latency table JSON (``kind: "latency"``)."""

    KIND: ClassVar[str] = "latency"

    base_ms: Finite
    ms: Annotated[dict[Name, Annotated[dict[FormatName, Millis], Field(min_length=1, description="map formats to milliseconds")]],
                  Field(description="map layer names to {format: ms}")]
    meta: Optional[LatencyMeta] = None
    provenance: Optional[dict[str, Any]] = None


# --------------------------------------------------------------------------- fronts
class CandidateRecord(_Strict):
    """One candidate of a front (``Candidate.to_dict()``)."""

    key: Optional[str] = None
    label: Optional[str] = None
    source: str = ""
    proxy_loss: Optional[Loss] = None
    predicted_latency_ms: Optional[Finite] = None
    memory_bytes: Optional[NonNegInt] = None
    kl: Optional[Score] = None
    measured_latency_ms: Optional[Millis] = None
    trial: Optional[NonNegInt] = None
    meta: dict[str, Any] = {}
    policy: PolicyDict


class Failure(_Strict):
    """A failed trial as a front records it."""

    trial: Optional[int] = None
    reason: Any = None
    label: Any = None
    params_key: Any = None


class FrontFile(_JsonArtifact):
    """A front JSON from ``search`` or ``refine`` (``kind: "front"``): header, failures, candidates.

    The header fields are those :func:`mpsearch.search` / :func:`mpsearch.refine` and the
    callers of ``write_front`` record; a new header field is declared here.
    """

    KIND: ClassVar[str] = "front"

    stage: Optional[str] = None
    study_name: Optional[str] = None
    storage: Optional[str] = None
    sampler: Optional[str] = None
    seed: Optional[int] = None
    n_trials: Optional[int] = None
    space: Optional[str] = None
    budget_ms: Optional[Finite] = None
    budget_mb: Optional[Finite] = None
    objectives: Optional[list[str]] = None
    seeding: Optional[str] = None
    memory_scope: Optional[str] = None
    ilp: Optional[dict[str, Any]] = None
    trials: Optional[dict[str, Any]] = None
    ms_per_trial: Optional[float] = None
    cpu_ms_per_trial: Optional[float] = None
    sensitivity: Optional[str] = None
    model: Optional[str] = None
    device: Optional[str] = None
    workload: Optional[dict[str, Any]] = None
    calibration_rows: Optional[int] = None
    seconds: Optional[dict[str, Any]] = None
    seeds_skipped: Optional[Any] = None
    fidelity: Optional[dict[str, Any]] = None
    inputs: Optional[dict[str, Any]] = None
    provenance: Optional[dict[str, Any]] = None
    failures: list[Failure] = []
    candidates: Annotated[list[CandidateRecord], Field(description="be a list of candidates")]


# --------------------------------------------------------------------------- results
class ResultBody(_Strict):
    """One evaluated policy (``Result.to_dict()``)."""

    policy: PolicyDict
    policy_key: Optional[str] = None
    accuracy: Share = 0.0
    accuracy_ci: Annotated[list[Share], Field(min_length=2, max_length=2, description="be [low, high]")] = [0.0, 0.0]
    per_subject: dict[str, Share] = {}
    per_skill: dict[str, Share] = {}
    per_skill_ci: dict[str, Annotated[list[Share], Field(min_length=2, max_length=2)]] = {}
    per_skill_n: dict[str, NonNegInt] = {}
    per_discipline: dict[str, Share] = {}
    flips: Optional[Share] = None
    kl: Optional[Score] = None
    latency_ms: Optional[Millis] = None
    memory_bytes: Optional[NonNegInt] = None
    predicted_latency_ms: Optional[Finite] = None
    peak_memory_bytes: Optional[NonNegInt] = None
    n: NonNegInt = 0
    n_skipped: NonNegInt = 0
    fallbacks: NonNegInt = 0
    mode: Literal["logits", "generate"] = "logits"
    benchmark: str = ""
    split: str = ""
    limit: Optional[NonNegInt] = None
    label: str = ""
    baseline: bool = False
    per_subject_n: dict[str, NonNegInt] = {}
    answers: dict[str, Any] = {}
    correct: dict[str, bool] = {}
    seconds: Millis = 0.0
    notes: list[str] = []


class ResultRecord(_JsonArtifact):
    """One line of a results JSONL file (``kind: "eval_result"``)."""

    KIND: ClassVar[str] = "eval_result"

    identity: Optional[dict[str, Any]] = None
    provenance: Optional[dict[str, Any]] = None
    result: ResultBody


# --------------------------------------------------------------------------- stages file
class StageRecord(_Strict):
    """What ``stages.json`` remembers of one stage."""

    inputs: Name
    artifact: Name


class StagesFile(_JsonArtifact):
    """``stages.json`` of ``mpsearch run`` (``kind: "run-stages"``)."""

    KIND: ClassVar[str] = "run-stages"

    stages: dict[Name, StageRecord] = {}


# --------------------------------------------------------------------------- errors
_TYPE_WORDS = {
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "list_type": "a list", "tuple_type": "a list", "string_type": "a string", "int_type": "an integer",
    "int_from_float": "an integer", "int_parsing": "an integer", "float_type": "a number",
    "float_parsing": "a number", "bool_type": "true or false", "bool_parsing": "true or false",
    "none_required": "null",
}


def _unwrap(ann: Any) -> Any:
    """Strip ``Annotated`` and ``Optional`` from an annotation."""
    while True:
        origin = typing.get_origin(ann)
        if origin is Annotated:
            ann = typing.get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            ann = args[0] if len(args) == 1 else Any
        else:
            return ann


def _description(ann: Any) -> str | None:
    """The ``Field(description=...)`` attached to an ``Annotated`` type, if any."""
    while typing.get_origin(ann) in (Annotated, Union, types.UnionType):
        if typing.get_origin(ann) is Annotated:
            for m in typing.get_args(ann)[1:]:
                desc = getattr(m, "description", None)
                if desc:
                    return desc
            ann = typing.get_args(ann)[0]
        else:
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return None
            ann = args[0]
    return None


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[tuple[str, Any]], type[BaseModel] | None, str | None]:
    """Follow a pydantic error location through the schema.

    Returns the parts (``("field" | "key" | "index", value)``), the model holding the last part
    (for listing valid fields) and the description of the last part's type.
    """
    parts: list[tuple[str, Any]] = []
    ann: Any = model
    holder: type[BaseModel] | None = None
    desc: str | None = None
    for el in loc:
        if el == "[key]":
            continue
        cur = _unwrap(ann)
        if isinstance(cur, type) and issubclass(cur, BaseModel):
            holder = cur
            info = None
            for name, fi in cur.model_fields.items():
                if (fi.alias or name) == el:
                    info = fi
                    break
            parts.append(("field", el))
            if info is None:
                ann, desc = Any, None
            else:
                desc = info.description
                ann = info.annotation if not info.metadata else Annotated[tuple([info.annotation, *info.metadata])]
                desc = desc or _description(ann)
            continue
        origin = typing.get_origin(cur)
        if origin is dict:
            parts.append(("key", el))
            ann = typing.get_args(cur)[1]
        elif origin is list:
            parts.append(("index", el))
            ann = typing.get_args(cur)[0]
        else:
            parts.append(("index" if isinstance(el, int) else "key", el))
            ann = Any
        desc = _description(ann)
    return parts, holder, desc


def _render(parts: list[tuple[str, Any]]) -> str:
    out = ""
    for kind, value in parts:
        if kind == "field":
            out += f".{value}" if out else str(value)
        elif kind == "index":
            out += f"[{value}]"
        else:
            out += f"[{value!r}]"
    if len(parts) == 1 and parts[0][0] == "field":
        return repr(out)
    return out


def _describe(model: type[BaseModel], err: Mapping[str, Any]) -> str:
    """One error as words: the field path and what would be valid."""
    loc = tuple(err.get("loc") or ())
    typ = err.get("type", "")
    value = err.get("input")
    ctx = err.get("ctx") or {}
    is_key = "[key]" in loc
    parts, holder, desc = _walk(model, loc)
    if typ == "extra_forbidden":
        owner = _render(parts[:-1]) if len(parts) > 1 else ""
        valid = ", ".join(fi.alias or n for n, fi in holder.model_fields.items()) if holder else ""
        where = f" in {owner.strip(chr(39))}" if owner else ""
        return f"unknown field {parts[-1][1]!r}{where}; valid: {valid}"
    if not parts:
        if typ in ("model_type", "model_attributes_type", "dict_type"):
            return f"{model.NOT_MAPPING} (found {type(value).__name__})"
        return str(err.get("msg", "invalid"))
    path = _render(parts)
    if is_key:
        key_parts = parts
        owner = _render(key_parts[:-1]) if len(key_parts) > 1 else "the document"
        if typ == "mps":
            return f"key {value!r} in {owner}: {err.get('msg')}"
        if typ == "literal_error":
            return f"key {value!r} in {owner} is not valid; valid: {_expected(ctx)}"
        what = _TYPE_WORDS.get(typ)
        if what:
            return f"key {value!r} in {owner} must be {what} (a name)"
        return f"key {value!r} in {owner}: {str(err.get('msg', 'invalid')).lower()}"
    if typ == "mps":
        msg = str(err.get("msg", ""))
        if msg.startswith(("is ", "must ", "has ", "(")):
            return f"field {path} {msg}"
        return f"field {path}: {msg}"
    if typ == "missing":
        return f"field {path} is missing (required)"
    if typ == "literal_error":
        return f"field {path} is {_short(value)}; valid: {_expected(ctx)}"
    if typ in _TYPE_WORDS:
        if desc:
            return f"field {path} must {desc}, got {_short(value)}"
        return f"field {path} must be {_TYPE_WORDS[typ]}, got {_short(value)}"
    if typ in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[typ]
        bound = next(iter(ctx.values()), "?")
        return f"field {path} must be {op} {bound}, got {_short(value)}"
    if typ in ("too_short", "string_too_short"):
        if ctx.get("min_length") == 1:
            return f"field {path} must not be empty"
        return f"field {path} must have at least {ctx.get('min_length')} items, got {_short(value)}"
    if typ == "too_long":
        return f"field {path} must have at most {ctx.get('max_length')} items, got {_short(value)}"
    if typ == "finite_number":
        return f"field {path} must be a finite number, got {_short(value)}"
    return f"field {path}: {str(err.get('msg', 'invalid')).lower()}, got {_short(value)}"


def _expected(ctx: Mapping[str, Any]) -> str:
    text = str(ctx.get("expected", ""))
    return text.replace("'", "").replace(" or ", ", ")


def _order(err: Mapping[str, Any]) -> int:
    loc = tuple(err.get("loc") or ())
    if loc[:1] in (("kind",), ("schema",)):
        return 0  # a foreign file: say so before anything else
    if err.get("type") == "extra_forbidden":
        return 1  # a misspelt key explains the 'missing' that may follow
    return 2


def _where(source: Any, lines: Mapping[tuple[Any, ...], int] | None, model: type[BaseModel],
           loc: tuple[Any, ...]) -> str:
    """``file:line`` of an error location (or of its nearest parent the lines know)."""
    if not lines or not loc:  # a whole-document problem has no one line
        return str(source)
    exact = tuple(el for el in loc if el != "[key]")
    parts, _, _ = _walk(model, loc)
    as_text = tuple(v if kind == "index" else (v if isinstance(v, str) else str(v)) for kind, v in parts)
    for depth in range(max(len(exact), len(as_text)), 0, -1):
        for key in (exact[:depth], as_text[:depth]):
            if key in lines:
                return f"{source}:{lines[key]}"
    line = lines.get(())
    return f"{source}:{line}" if line else str(source)


def json_lines(text: str) -> dict[tuple[Any, ...], int]:
    """``{key path: line}`` of a JSON text (JSON is read as YAML for the positions); {} if that fails."""
    try:
        import yaml

        from mpsearch._yaml import _walk as walk_nodes

        node = yaml.compose(text, Loader=yaml.SafeLoader)
        lines: dict[tuple[Any, ...], int] = {}
        if node is not None:
            walk_nodes(node, (), lines)
        return lines
    except Exception:  # noqa: BLE001 - positions are a nicety; the message stands without them
        return {}


def validate(model: type[M], data: Any, source: Any, lines: Mapping[tuple[Any, ...], int] | None = None,
             json_text: str | None = None) -> M:
    """Validate ``data`` against ``model``; raise one :class:`ArtifactError` line on failure.

    ``source`` names the file (or object) in the message; ``lines`` (from
    :func:`mpsearch._yaml.load_yaml`) add the line; ``json_text`` is the text of a JSON file whose
    line numbers are worked out only when there is an error to report.

    Example:
        >>> validate(StageRecord, {"inputs": "a", "artifact": 3}, "stages.json")
        Traceback (most recent call last):
        ...
        mpsearch.errors.ArtifactError: stages.json: field 'artifact' must be a string, got 3
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = sorted(exc.errors(include_url=False), key=_order)
        first = errors[0]
        if lines is None and json_text is not None:
            lines = json_lines(json_text)
        more = len(errors) - 1
        tail = f" ({more} more problem{'s' if more > 1 else ''} after this one)" if more else ""
        loc = tuple(first.get("loc") or ())
        raise ArtifactError(f"{_where(source, lines, model, loc)}: {_describe(model, first)}{tail}") from None


def validate_object(model: type[M], data: Any, what: str) -> M:
    """:func:`validate` for values handed over in Python (``what`` names the object)."""
    return validate(model, data, what)


def read_json_artifact(path: str | Path, model: type[M]) -> tuple[dict[str, Any], M]:
    """Read a JSON artifact and validate it whole; returns the parsed dict and the validated model.

    Raises :class:`ArtifactError` for a missing file, invalid JSON or anything the schema refuses
    (with the line of the offending key: artifacts are written one key per line).
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{p}: not valid JSON (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ArtifactError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{p}: expected a JSON object, found {type(obj).__name__}")
    return obj, validate(model, obj, p, json_text=text)
