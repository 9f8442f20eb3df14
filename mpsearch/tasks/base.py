"""The Benchmark type and the data plumbing shared by the loaders (hub, caches, local copies).

A :class:`Benchmark` is a split of questions in the MMMU schema: every row is a dict with
``id``, ``question`` (``<image N>`` placeholders), ``options`` (a string holding a Python list,
``"[]"`` for open questions), ``answer`` (a letter, a string, or a string holding a list),
``question_type`` (``multiple-choice`` or ``open``), ``image_1`` … ``image_7`` (PIL images or
None) and ``subject``. Rows of datasets loaded with ``datasets`` are decoded on access, so a
large split costs no memory until it is read. The light fields every scorer needs (id,
subject, type, options, answer) are read up front without decoding any image:
:meth:`Benchmark.question` returns them parsed.

Where data comes from (first that has the split wins, and :attr:`Benchmark.source` says which):

1. ``path`` given: a local directory (see :func:`local_segments` for the layouts), or a hub id
   such as ``"MMMU/MMMU"`` when no such directory exists and it reads ``owner/name``;
2. no path: a snapshot of the hub repository in the hub cache (``HF_HUB_CACHE``, what
   ``huggingface-cli download`` or an earlier run left), read from its parquet files;
3. ``datasets.load_dataset(hub_id, config, split=...)``: the hub, or the datasets cache when
   offline. Before asking the hub, the endpoint is probed (3 s); when unreachable the load runs
   in offline mode (cache only) and says so in a warning, instead of retrying for minutes.

Example:
    >>> from mpsearch.tasks import load_benchmark
    >>> bench = load_benchmark("synthetic", split="dev", limit=4)
    >>> len(bench), bench.question(0).choices
    (4, ['A', 'B', 'C', 'D'])
"""
from __future__ import annotations

import ast
import bisect
import contextlib
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlparse

from mpsearch.errors import MpsError

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

LOCAL_LAYOUTS = (
    "DIR saved with datasets.save_to_disk as one DatasetDict (DIR/dataset_dict.json) whose split "
    "holds every subject; "
    "DIR/<Subject>/ one DatasetDict per subject (DIR/Art/dataset_dict.json, ...); "
    "DIR/<split>/ or DIR/<Subject>/<split>/ a saved Dataset; "
    "DIR a saved Dataset (taken as the split asked for); "
    "a snapshot of the hub repository (parquet files named <split>-*.parquet, per subject folder or not)"
)


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


# --------------------------------------------------------------------------- datasets plumbing
def _datasets() -> Any:
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise MpsError("the 'datasets' package is needed to load benchmarks: pip install datasets") from None
    return datasets


def _split_of_dict(dd: Any, split: str, where: str) -> Any:
    if split not in dd:
        raise MpsError(f"{where}: no split {split!r}; it has {sorted(dd.keys())}")
    return dd[split]


def local_segments(path: Path, split: str) -> list[tuple[str | None, Any, str]]:
    """Datasets for ``split`` under a local directory: ``[(folder hint, Dataset, where)]``.

    The hint is the name of the per-subject folder when the layout has one (else None).
    Layouts accepted: see :data:`LOCAL_LAYOUTS`. Raises :class:`MpsError` naming the directory
    and the layouts when none matches.
    """
    ds_mod = _datasets()
    path = Path(path)
    if not path.is_dir():
        raise MpsError(f"{path}: no such directory (pass a directory saved with datasets.save_to_disk, or a hub id)")

    def load(p: Path) -> Any:
        try:
            return ds_mod.load_from_disk(str(p))
        except Exception as exc:  # corrupt or foreign directory
            raise MpsError(f"{p}: cannot be read with datasets.load_from_disk ({type(exc).__name__}: {exc})") from None

    if (path / "dataset_dict.json").is_file():
        return [(None, _split_of_dict(load(path), split, str(path)), str(path))]
    if (path / split / "state.json").is_file():
        return [(None, load(path / split), str(path / split))]
    if (path / "state.json").is_file():
        return [(None, load(path), str(path))]
    out: list[tuple[str | None, Any, str]] = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        if (sub / "dataset_dict.json").is_file():
            dd = load(sub)
            if split in dd:
                out.append((sub.name, dd[split], str(sub)))
        elif (sub / split / "state.json").is_file():
            out.append((sub.name, load(sub / split), str(sub / split)))
    if out:
        return out
    out = _parquet_segments(path, split)
    if out:
        return out
    raise MpsError(f"{path}: no split {split!r} found; accepted layouts: {LOCAL_LAYOUTS}")


def _parquet_segments(root: Path, split: str) -> list[tuple[str | None, Any, str]]:
    files = sorted(root.rglob(f"{split}-*.parquet")) + sorted(root.rglob(f"{split}/*.parquet"))
    if not files:
        return []
    ds_mod = _datasets()
    groups: dict[Path, list[str]] = {}
    for f in files:
        groups.setdefault(f.parent, []).append(str(f))
    out: list[tuple[str | None, Any, str]] = []
    for parent, fs in sorted(groups.items()):
        ds = ds_mod.load_dataset("parquet", data_files={split: sorted(set(fs))}, split=split)
        hint = parent.name if parent != root and parent.name not in (split, "data") else None
        out.append((hint, ds, str(parent)))
    return out


def hub_cache_dir() -> str:
    """The hub cache folder (``HF_HUB_CACHE``)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        return os.path.expanduser("~/.cache/huggingface/hub")


def datasets_cache_dir() -> str:
    """The datasets cache folder (``HF_DATASETS_CACHE``)."""
    return str(_datasets().config.HF_DATASETS_CACHE)


def hub_snapshot_segments(repo_id: str, split: str) -> list[tuple[str | None, Any, str]]:
    """Parquet segments of ``split`` in the newest hub-cache snapshot of dataset ``repo_id`` ([] if none)."""
    root = Path(hub_cache_dir()) / ("datasets--" + repo_id.replace("/", "--")) / "snapshots"
    if not root.is_dir():
        return []
    for snap in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True):
        segs = _parquet_segments(snap, split)
        if segs:
            return segs
    return []


def _offline_env() -> bool:
    try:
        return bool(_datasets().config.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint answers a TCP connection within ``timeout`` seconds.

    Skipped (True) when a proxy is configured: the proxy decides.
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_mode(on: bool) -> Iterator[None]:
    """Temporarily force the hub libraries into offline mode (cache only)."""
    if not on:
        yield
        return
    ds_mod = _datasets()
    from huggingface_hub import constants

    old = (ds_mod.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    ds_mod.config.HF_HUB_OFFLINE = True
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        ds_mod.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = old


class HubState:
    """Decides once per load whether to ask the hub or stay on the cache (see :func:`hub_reachable`)."""

    def __init__(self) -> None:
        self.offline_env = _offline_env()
        self._reachable: bool | None = None

    @property
    def offline(self) -> bool:
        if self.offline_env:
            return True
        if self._reachable is None:
            self._reachable = hub_reachable()
            if not self._reachable:
                warnings.warn("the Hugging Face hub is unreachable: looking in the local datasets cache only",
                              stacklevel=3)
        return not self._reachable

    def describe(self) -> str:
        if self.offline_env:
            return "offline mode: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set"
        if self._reachable is False:
            return "hub unreachable"
        return "online"


class NotFound(Exception):
    """Internal: a hub/cache load found nothing (turned into one MpsError by the caller)."""


def load_hub_config(repo_id: str, config: str | None, split: str, hub: HubState) -> Any:
    """``datasets.load_dataset(repo_id, config, split=split)``, offline when the hub is out of reach.

    Raises :class:`NotFound` when neither the hub nor the cache has it, :class:`MpsError` for an
    unknown split or config.
    """
    ds_mod = _datasets()
    with _offline_mode(hub.offline):
        try:
            return ds_mod.load_dataset(repo_id, config, split=split)
        except ValueError as exc:
            msg = str(exc)
            if "split" in msg.lower() and "unknown" in msg.lower():
                raise MpsError(f"{repo_id}{'/' + config if config else ''}: no split {split!r} ({msg.splitlines()[0]})") from None
            if "BuilderConfig" in msg or "Config name" in msg:
                raise MpsError(f"{repo_id}: no config {config!r} ({msg.splitlines()[0]})") from None
            raise NotFound(msg) from None
        except (ConnectionError, FileNotFoundError, OSError) as exc:
            raise NotFound(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:  # DatasetNotFoundError and friends
            if type(exc).__name__ in ("DatasetNotFoundError", "LocalEntryNotFoundError", "EmptyDatasetError",
                                      "RepositoryNotFoundError", "HfHubHTTPError", "OfflineModeIsEnabled"):
                raise NotFound(f"{type(exc).__name__}: {exc}") from None
            raise


def not_found_message(name: str, repo_id: str, split: str, hub: HubState, path: Any = None) -> str:
    """The one-line 'where I looked and how to pass a local copy' message."""
    where = [f"path {path}"] if path is not None else []
    where += [f"hub {repo_id} ({hub.describe()})", f"hub cache {hub_cache_dir()}", f"datasets cache {datasets_cache_dir()}"]
    return (f"{name} split {split!r} not found; looked in: {'; '.join(where)}. Download it once where the hub is "
            f"reachable, or pass a local copy: load_benchmark({name!r}, {split!r}, path=DIR) / --data DIR "
            f"(a directory written by datasets.save_to_disk, or a snapshot of {repo_id})")


def is_hub_id(text: str) -> bool:
    """``owner/name`` with nothing path-like about it."""
    t = str(text)
    return t.count("/") == 1 and not t.startswith((".", "/", "~")) and all(p.strip() for p in t.split("/"))


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
