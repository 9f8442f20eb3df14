"""SEED-Bench (image questions) mapped to the MMMU schema.

Source: ``lmms-lab/SEED-Bench`` on the hub (one split, ``test``, 17,990 questions of which
14,233 are image questions), a snapshot of it, or a directory saved with ``datasets``. Fields
read: ``question``, ``choice_a`` … ``choice_d``, ``answer`` (a letter), ``image`` (a list of
images, or one image), ``question_type_id`` (1–12), ``data_type`` (``image``/``video``),
``question_id`` (or ``data_id``).

Mapping, per row: ``options`` = ``repr([choice_a, choice_b, choice_c, choice_d])`` (a string
holding a Python list, as in MMMU); ``question`` = ``"<image 1> " + question`` (one placeholder
per image, in order); ``image_1`` … from ``image``; ``question_type`` = ``multiple-choice``;
``subject`` = the evaluation dimension named by ``question_type_id`` (``Scene Understanding``
…). Video items (``data_type`` other than ``image``; without that field, dimensions 10–12)
are skipped, and the benchmark's ``notes`` say how many.

Departure from SEED-Bench's own evaluation, documented in docs/architecture.md: SEED-Bench
ranks the likelihood of each choice's text; here questions are asked with the MMMU prompt
(``(A) text`` lines and the letter instruction) and answers parsed by the MMMU rules, the way
lmms-eval asks them (lmms-eval letters options ``A. text``).

Example:
    >>> load("test", path="data/seedbench", limit=10)  # doctest: +SKIP
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from mpsearch.errors import MpsError
from mpsearch.tasks import base

HUB_ID = "lmms-lab/SEED-Bench"
SPLITS = ("test",)
#: SEED-Bench-1 evaluation dimensions (question_type_id -> name); 10-12 are video dimensions.
QUESTION_TYPES: dict[int, str] = {
    1: "Scene Understanding",
    2: "Instance Identity",
    3: "Instance Attributes",
    4: "Instance Location",
    5: "Instances Counting",
    6: "Spatial Relation",
    7: "Instance Interaction",
    8: "Visual Reasoning",
    9: "Text Understanding",
    10: "Action Recognition",
    11: "Action Prediction",
    12: "Procedure Understanding",
}
VIDEO_TYPES = (10, 11, 12)
SUBJECTS = [QUESTION_TYPES[i] for i in range(1, 10)]
_REQUIRED = ("question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "image")
LETTERS = ("a", "b", "c", "d")


def _type_name(value: Any, where: str) -> str:
    try:
        return QUESTION_TYPES[int(value)]
    except (KeyError, TypeError, ValueError):
        raise MpsError(f"{where}: field 'question_type_id' is {value!r}; valid: 1..12 (SEED-Bench dimensions)") from None


def resolve_subjects(subjects: Iterable[str] | str | None) -> list[str] | None:
    """Dimension names from names (any case, ``_`` for spaces) or ids (``"1"``).

    Example:
        >>> resolve_subjects(["scene_understanding", "9"])
        ['Scene Understanding', 'Text Understanding']
    """
    if subjects is None:
        return None
    if isinstance(subjects, str):
        subjects = [s for s in subjects.split(",") if s.strip()]
    lookup = {n.lower().replace(" ", "_"): n for n in SUBJECTS}
    lookup.update({str(i): n for i, n in QUESTION_TYPES.items() if i not in VIDEO_TYPES})
    out: list[str] = []
    for s in subjects:
        key = str(s).strip().lower().replace(" ", "_")
        if key not in lookup:
            raise MpsError(f"subjects: {s!r} is not a SEED-Bench image dimension; valid: {', '.join(SUBJECTS)} (or 1..9)")
        if lookup[key] not in out:
            out.append(lookup[key])
    return out


def to_mmmu_row(row: dict, subject: str, qid: str) -> dict:
    """One SEED-Bench row in the MMMU schema (see the module docstring)."""
    images = row.get("image")
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    images = [im for im in images if im is not None]
    if len(images) > base.MAX_IMAGES:
        raise MpsError(f"SEED-Bench question {qid}: {len(images)} images; at most {base.MAX_IMAGES} are supported")
    prefix = "".join(f"<image {i}> " for i in range(1, len(images) + 1))
    out = {
        "id": qid,
        "question": prefix + str(row["question"]),
        "options": repr([str(row[f"choice_{c}"]) for c in LETTERS]),
        "answer": str(row["answer"]).strip(),
        "question_type": "multiple-choice",
        "subject": subject,
        "question_type_id": row.get("question_type_id"),
        "data_type": row.get("data_type"),
    }
    for i in range(1, base.MAX_IMAGES + 1):
        out[f"image_{i}"] = images[i - 1] if i <= len(images) else None
    return out


def _segment(ds: Any, where: str) -> tuple[base.Segment, int]:
    base.require_columns(ds, where, _REQUIRED, "SEED-Bench")
    n = len(ds)
    idcol = "question_id" if "question_id" in ds.column_names else ("data_id" if "data_id" in ds.column_names else None)
    ids = [str(v) for v in base.column(ds, idcol)] if idcol else [f"seed_{k}" for k in range(n)]
    types = base.column(ds, "question_type_id") if "question_type_id" in ds.column_names else [None] * n
    if "data_type" in ds.column_names:
        is_image = [str(v).strip().lower() == "image" for v in base.column(ds, "data_type")]
    elif "question_type_id" in ds.column_names:
        is_image = [int(t) not in VIDEO_TYPES for t in types]
    else:
        raise MpsError(f"{where}: neither 'data_type' nor 'question_type_id' present; cannot tell image from video items")
    answers = base.column(ds, "answer")
    choices = {c: base.column(ds, f"choice_{c}") for c in LETTERS}
    keep: list[int] = []
    questions: list[base.Question] = []
    subjects: dict[int, str] = {}
    for k in range(n):
        if not is_image[k]:
            continue
        subj = _type_name(types[k], f"{where} row {k}") if types[k] is not None else "SEED-Bench"
        subjects[k] = subj
        keep.append(k)
        questions.append(base.Question(ids[k], subj, "multiple-choice", [str(choices[c][k]) for c in LETTERS],
                                       base.parse_answer(str(answers[k]).strip())))

    def mapper(row: dict, j: int) -> dict:
        return to_mmmu_row(row, subjects[j], ids[j])

    return base.Segment(ds, where, keep, questions, mapper), n - len(keep)


def load(split: str = "test", path: str | os.PathLike[str] | None = None,
         subjects: Iterable[str] | str | None = None, limit: int | None = None) -> base.Benchmark:
    """Load SEED-Bench's image questions in the MMMU schema (video items skipped).

    Example:
        >>> bench = load("test", path="data/seedbench", subjects=["Scene Understanding"])  # doctest: +SKIP
    """
    if split not in SPLITS:
        raise MpsError(f"seedbench: split {split!r} does not exist; valid: {', '.join(SPLITS)}")
    wanted = resolve_subjects(subjects)
    hub = base.HubState()
    if path is not None and Path(path).expanduser().is_dir():
        root = Path(path).expanduser()
        raw = base.local_segments(root, split)
        source = str(root)
    elif path is not None and not base.is_hub_id(str(path)):
        raise MpsError(f"{path}: no such directory (pass a directory saved with datasets.save_to_disk, "
                       f"a snapshot of {HUB_ID}, or a hub id such as {HUB_ID})")
    else:
        repo = str(path) if path is not None else HUB_ID
        raw = base.hub_snapshot_segments(repo, split)
        source = f"hub cache {repo}"
        if not raw:
            try:
                raw = [(None, base.load_hub_config(repo, None, split, hub), repo)]
            except base.NotFound:
                raise MpsError(base.not_found_message("seedbench", repo, split, hub)) from None
            source = f"{repo} via datasets.load_dataset ({hub.describe()})"
    segments = []
    skipped = 0
    for _, ds, where in raw:
        seg, n_skip = _segment(ds, where)
        segments.append(seg)
        skipped += n_skip
    notes = [f"skipped {skipped} video questions"] if skipped else []
    return base.assemble("seedbench", split, segments, wanted, limit, source, notes)
