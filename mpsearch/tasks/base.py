"""The Benchmark type: questions in the MMMU schema, rows decoded lazily, assembled from segments.

A :class:`Benchmark` is a split of questions in the MMMU schema: every row is a dict with
``id``, ``question`` (``<image N>`` placeholders), ``options`` (a string holding a Python list,
``"[]"`` for open questions), ``answer`` (a letter, a string, or a string holding a list),
``question_type`` (``multiple-choice`` or ``open``), ``image_1`` … ``image_7`` (PIL images or
None) and ``subject``. Rows of datasets loaded with ``datasets`` are decoded on access, so a
large split costs no memory until it is read. The light fields every scorer needs (id,
subject, type, options, answer) are read up front without decoding any image:
:meth:`Benchmark.question` returns them parsed.

Where the rows come from (hub, caches, local copies) is :mod:`mpsearch.tasks.sources`.

Example:
    >>> from mpsearch.tasks import load_benchmark
    >>> bench = load_benchmark("synthetic", split="dev", limit=4)
    >>> len(bench), bench.question(0).choices
    (4, ['A', 'B', 'C', 'D'])
"""
from __future__ import annotations

import ast
import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from mpsearch.errors import MpsError
from mpsearch.tasks.sources import (  # noqa: F401 - where the rows come from, re-exported for the loaders
    LOCAL_LAYOUTS, HubState, NotFound, datasets_cache_dir, hub_cache_dir, hub_reachable, hub_snapshot_segments,
    is_hub_id, load_hub_config, local_segments, not_found_message)

__all__ = [
    "Benchmark",
    "Question",
    "MAX_IMAGES",
    "WITHHELD",
    "parse_answer",
    "interleave_by_subject",
    "local_segments",
    "hub_snapshot_segments",
    "load_hub_config",
    "LOCAL_LAYOUTS",
]

MAX_IMAGES = 7
#: Answer values that mean "withheld" (MMMU test uses "?").
WITHHELD = ("", "?")



# --------------------------------------------------------------------------- parsed questions
def parse_answer(raw: Any) -> str | list[str] | None:
    """The gold answer: ``None`` when withheld (``"?"``/empty), a list for a string holding a list.

    A few MMMU open questions have several acceptable answers stored as ``"['24', '24.0']"``; the
    official answer file holds them as lists, so they are read with ``ast.literal_eval``.

    Example:
        >>> parse_answer("B"), parse_answer("['3', 'three']"), parse_answer("?")
        ('B', ['3', 'three'], None)
    """
    if raw is None:
        return None
    if isinstance(raw, (list, tuple)):
        return [str(a) for a in raw]
    text = str(raw)
    if text.strip() in WITHHELD:
        return None
    s = text.strip()
    if s.startswith("[") and s.endswith("]"):
        try:
            value = ast.literal_eval(s)
        except (ValueError, SyntaxError):
            return text
        if isinstance(value, (list, tuple)):
            return [str(a) for a in value]
    return text


def _parse_options(raw: Any, where: str) -> list[str]:
    from mpsearch.tasks.prompts import parse_options

    try:
        return parse_options(raw)
    except (ValueError, SyntaxError) as exc:
        raise MpsError(f"{where}: field 'options' must be a string holding a Python list ({exc})") from None


@dataclass(frozen=True)
class Question:
    """The parsed, image-free part of a row: what scoring needs.

    Example:
        >>> q = Question("x_1", "Art", "multiple-choice", ["red", "blue"], "B")
        >>> q.choices, q.index2ans
        (['A', 'B'], {'A': 'red', 'B': 'blue'})
    """

    id: str
    subject: str
    question_type: str
    options: list[str]
    answer: str | list[str] | None
    #: what the question tests, where the benchmark says (the synthetic set: perception / reasoning)
    skill: str | None = None

    @property
    def is_multiple_choice(self) -> bool:
        """True for ``question_type == "multiple-choice"`` (everything else is scored as open)."""
        return self.question_type == "multiple-choice"

    @property
    def choices(self) -> list[str]:
        """Option letters, from ``A``."""
        return [chr(ord("A") + i) for i in range(len(self.options))]

    @property
    def index2ans(self) -> dict[str, str]:
        """Letter -> option text."""
        return dict(zip(self.choices, self.options))


# --------------------------------------------------------------------------- lazy rows
class LazyRows(Sequence[dict]):
    """Rows of one or more ``datasets.Dataset`` segments, mapped to the MMMU schema on access."""

    def __init__(self, segments: list[tuple[Any, list[int], Callable[[dict, int], dict]]]) -> None:
        self._segments = [s for s in segments if s[1]]
        self._starts: list[int] = []
        total = 0
        for _, idx, _ in self._segments:
            self._starts.append(total)
            total += len(idx)
        self._len = total

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: Any) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        s = bisect.bisect_right(self._starts, i) - 1
        ds, idx, mapper = self._segments[s]
        j = idx[i - self._starts[s]]
        return mapper(ds[j], j)

    def take(self, order: Sequence[int]) -> "LazyRows":
        """A new LazyRows of the rows at ``order`` (positions in this sequence)."""
        segs: list[tuple[Any, list[int], Callable[[dict, int], dict]]] = []
        for i in order:
            s = bisect.bisect_right(self._starts, i) - 1
            ds, idx, mapper = self._segments[s]
            j = idx[i - self._starts[s]]
            if segs and segs[-1][0] is ds and segs[-1][2] is mapper:
                segs[-1][1].append(j)
            else:
                segs.append((ds, [j], mapper))
        return LazyRows(segs)


# --------------------------------------------------------------------------- the benchmark
@dataclass
class Benchmark:
    """A split of questions in the MMMU schema.

    ``rows``: the rows (dicts, images decoded on access); ``questions``: their parsed light
    fields; ``source``: where they were loaded from; ``notes``: what the loader did that a reader
    should know (skipped video items, interleaving for ``limit``); ``has_answers``: False when any
    answer is withheld (MMMU test), which :meth:`require_answers` refuses.

    Example:
        >>> b = Benchmark("toy", "dev", [{"id": "t_1", "question": "q", "options": "['a', 'b']",
        ...     "answer": "A", "question_type": "multiple-choice", "subject": "Art"}], source="memory")
        >>> len(b), b.question(0).answer, b.has_answers
        (1, 'A', True)
    """

    name: str
    split: str
    rows: Sequence[dict]
    source: str = ""
    questions: list[Question] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    limit: int | None = None

    def __post_init__(self) -> None:
        if not self.questions:
            self.questions = [question_of(r, f"{self.name} {self.split} row {i}") for i, r in enumerate(self.rows)]
        if len(self.questions) != len(self.rows):
            raise ValueError("Benchmark: rows and questions differ in length")

    # -- sequence ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self.rows)):
            yield self.rows[i]

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def __repr__(self) -> str:
        return f"Benchmark({self.name!r}, split={self.split!r}, n={len(self)}, source={self.source!r})"

    # -- questions -----------------------------------------------------------------------
    def question(self, i: int) -> Question:
        """The parsed light fields of row ``i`` (no image decoded)."""
        return self.questions[i]

    @property
    def subjects(self) -> list[str]:
        """Subjects in order of first appearance."""
        return list(dict.fromkeys(q.subject for q in self.questions))

    @property
    def n_withheld(self) -> int:
        """How many rows have no usable answer (``"?"`` or empty)."""
        return sum(q.answer is None for q in self.questions)

    @property
    def has_answers(self) -> bool:
        """True when every row carries a gold answer (scoring allowed)."""
        return self.n_withheld == 0

    def require_answers(self) -> None:
        """Raise :class:`MpsError` when answers are withheld: such a split can be loaded, not scored."""
        n = self.n_withheld
        if n:
            raise MpsError(
                f"{self.name} split {self.split!r}: answers are withheld ({n} of {len(self)} rows have answer "
                f"'?' or empty) so it cannot be scored here; use a split with answers "
                f"(mmmu: dev or validation; test is scored only by the MMMU evaluation server)"
            )

    def select(self, order: Sequence[int]) -> "Benchmark":
        """A benchmark of the rows at ``order`` (same name, split and source)."""
        order = [int(i) for i in order]
        rows = self.rows.take(order) if isinstance(self.rows, LazyRows) else [self.rows[i] for i in order]
        return Benchmark(self.name, self.split, rows, self.source, [self.questions[i] for i in order],
                         list(self.notes), self.limit)


def question_of(row: Mapping[str, Any], where: str) -> Question:
    """Parse the light fields of one MMMU-schema row."""
    for key in ("question_type", "answer"):
        if key not in row:
            raise MpsError(f"{where}: field {key!r} missing (the MMMU schema has id, question, options, answer, "
                           f"question_type, image_1..image_7)")
    qtype = str(row["question_type"])
    opts = _parse_options(row.get("options", "[]"), where)
    skill = row.get("skill")
    return Question(str(row.get("id", "")), str(row.get("subject") or ""), qtype, opts, parse_answer(row["answer"]),
                    str(skill) if skill else None)


def interleave_by_subject(subjects: Sequence[str]) -> list[int]:
    """Positions in round-robin order over subjects (first question of each subject, then the second, ...).

    Subjects keep their order of first appearance; within a subject the original order stays.
    ``limit`` takes a prefix of this order, so a small limit still covers every subject.

    Example:
        >>> interleave_by_subject(["a", "a", "a", "b", "c", "c"])
        [0, 3, 4, 1, 5, 2]
    """
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(subjects):
        groups.setdefault(s, []).append(i)
    out: list[int] = []
    depth = 0
    lists = list(groups.values())
    while len(out) < len(subjects):
        for g in lists:
            if depth < len(g):
                out.append(g[depth])
        depth += 1
    return out


# --------------------------------------------------------------------------- assembling
@dataclass
class Segment:
    """Rows of one dataset that a loader keeps: positions, parsed questions, and the row mapper."""

    ds: Any
    where: str
    indices: list[int]
    questions: list[Question]
    mapper: Callable[[dict, int], dict]


def column(ds: Any, name: str) -> list[Any]:
    """One column as a list (no other column, hence no image, is decoded)."""
    return list(ds[name])


def require_columns(ds: Any, where: str, needed: Sequence[str], schema: str) -> None:
    """Raise :class:`MpsError` naming the missing fields of a dataset."""
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise MpsError(f"{where}: field(s) {missing} missing; {schema} rows need {list(needed)} "
                       f"(found {ds.column_names})")


def assemble(name: str, split: str, segments: Sequence[Segment], subjects: Sequence[str] | None = None,
             limit: int | None = None, source: str = "", notes: Sequence[str] = ()) -> Benchmark:
    """One Benchmark from loader segments: subject filter, ``limit`` (round-robin prefix), empty check."""
    segs: list[tuple[Any, list[int], Callable[[dict, int], dict]]] = []
    questions: list[Question] = []
    wanted = set(subjects) if subjects else None
    for seg in segments:
        keep = [k for k, q in enumerate(seg.questions) if wanted is None or q.subject in wanted]
        segs.append((seg.ds, [seg.indices[k] for k in keep], seg.mapper))
        questions.extend(seg.questions[k] for k in keep)
    rows: Sequence[dict] = LazyRows(segs)
    notes = list(notes)
    bench = Benchmark(name, split, rows, source, questions, notes) if questions else None
    if bench is None:
        what = f" for subjects {sorted(wanted)}" if wanted else ""
        raise MpsError(f"{name} split {split!r} from {source}: 0 questions{what}; nothing to evaluate")
    if limit is not None:
        if int(limit) < 1:
            raise MpsError(f"limit={limit}: must be a positive number of questions")
        order = interleave_by_subject([q.subject for q in questions])[: int(limit)]
        bench = bench.select(order)
        bench.limit = int(limit)
        if len(bench.subjects) > 1:
            bench.notes.append(f"limit {limit}: first {len(bench)} questions taken round-robin over subjects")
    return bench
