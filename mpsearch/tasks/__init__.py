"""Benchmarks in the MMMU schema: MMMU, SEED-Bench (image questions) and the synthetic demo set.

``load_benchmark(name, split, path=None, subjects=None, limit=None)`` returns a
:class:`~mpsearch.tasks.base.Benchmark`. Loading never needs answers; scoring does
(:meth:`Benchmark.require_answers` refuses MMMU test, whose answers are withheld).

Example:
    >>> from mpsearch.tasks import load_benchmark
    >>> bench = load_benchmark("synthetic", split="dev", limit=5)
    >>> bench.name, len(bench), bench.has_answers
    ('synthetic', 5, True)
"""
from __future__ import annotations

import os
from typing import Iterable

from mpsearch.errors import MpsError
from mpsearch.tasks.base import Benchmark, Question

__all__ = ["BENCHMARKS", "Benchmark", "Question", "load_benchmark"]

#: Benchmark names and their splits.
BENCHMARKS: dict[str, tuple[str, ...]] = {
    "mmmu": ("dev", "validation", "test"),
    "seedbench": ("test",),
    "synthetic": ("train", "dev", "validation"),
    "synthetic-v1": ("train", "dev", "validation"),
}
#: The generated benchmarks' modules (under ``mpsearch.tasks``): ``synthetic`` is the demo's
#: perception-and-reasoning set; ``synthetic-v1`` the perception-only set of the first demo model.
_SYNTHETIC_MODULES = {"synthetic": "synthetic", "synthetic-v1": "synthetic_v1"}


def _load_synthetic(split: str, path: object, subjects: Iterable[str] | str | None, limit: int | None,
                    seed: int, name: str = "synthetic") -> Benchmark:
    import importlib

    from mpsearch.tasks import base

    synthetic = importlib.import_module("mpsearch.tasks." + _SYNTHETIC_MODULES[name])

    if path is not None:
        raise MpsError(f"{name}: the benchmark is generated, not read; drop path= / --data "
                       "(a synthetic split saved with datasets loads as name='mmmu' with path=DIR)")
    if split not in BENCHMARKS[name]:
        raise MpsError(f"{name}: split {split!r} does not exist; valid: {', '.join(BENCHMARKS[name])}")
    wanted = None
    if subjects is not None:
        names = [s.strip() for s in subjects.split(",")] if isinstance(subjects, str) else [str(s) for s in subjects]
        lookup = {s.lower(): s for s in synthetic.SUBJECTS}
        bad = [s for s in names if s.lower() not in lookup]
        if bad:
            raise MpsError(f"subjects: {bad[0]!r} is not a {name} subject; valid: {', '.join(synthetic.SUBJECTS)}")
        wanted = [lookup[s.lower()] for s in names]
    if limit is not None and int(limit) < 1:
        raise MpsError(f"limit={limit}: must be a positive number of questions")
    # The generator interleaves question types by construction, so a prefix is already balanced.
    n = int(limit) if (limit is not None and wanted is None) else None
    rows = synthetic.generate(split, n=n, seed=seed)
    source = f"{synthetic.__name__}.generate(split={split!r}, seed={seed}, n={len(rows)})"
    seg = base.Segment(rows, source, list(range(len(rows))),
                       [base.question_of(r, f"{name} {split} row {i}") for i, r in enumerate(rows)],
                       lambda row, j: row)
    bench = base.assemble(name, split, [seg], wanted, limit if wanted else None, source)
    bench.limit = None if limit is None else int(limit)
    return bench


def load_benchmark(name: str, split: str = "validation", path: str | os.PathLike[str] | None = None,
                   subjects: Iterable[str] | str | None = None, limit: int | None = None,
                   seed: int = 0) -> Benchmark:
    """Load a benchmark split in the MMMU schema.

    ``name``: ``mmmu`` (hub ``MMMU/MMMU``, 30 subject configs, splits dev/validation/test),
    ``seedbench`` (``lmms-lab/SEED-Bench`` image questions, split test) or ``synthetic`` (the demo
    set, generated: perception and multi-step reasoning questions, each labelled with its skill;
    splits train/dev/validation; ``seed`` picks the stream; alias ``synthetic-reasoning``) or
    ``synthetic-v1`` (the first demo model's perception-only set). ``path``: a local
    copy (a ``datasets.save_to_disk`` directory or a hub snapshot) or another hub id; None looks in
    the hub cache, then asks ``datasets.load_dataset`` (hub, or its cache offline).
    ``subjects``: names to keep (MMMU also takes the official short names). ``limit``: the first N
    questions taken round-robin over subjects. Missing data, an unknown split or subject, and a
    split left empty raise :class:`MpsError` (one line; the CLI exits 2).

    Example:
        >>> load_benchmark("synthetic", "validation", limit=3).subjects
        ['Colour', 'Frequency', 'Shapes']
    """
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key == "mmmu":
        from mpsearch.tasks import mmmu

        return mmmu.load(split, path, subjects, limit)
    if key in ("seedbench", "seed"):
        from mpsearch.tasks import seedbench

        return seedbench.load(split, path, subjects, limit)
    if key in ("synthetic", "demo", "syntheticreasoning"):
        return _load_synthetic(split, path, subjects, limit, seed)
    if key == "syntheticv1":
        return _load_synthetic(split, path, subjects, limit, seed, name="synthetic-v1")
    raise MpsError(f"benchmark {name!r} unknown; valid: {', '.join(BENCHMARKS)}")
