"""The first demo model's benchmark (``load_benchmark("synthetic-v1")``): perception only, MMMU schema.

Every row is drawn deterministically from ``(split, seed, index)``: a 64x64 RGB picture made
with PIL and a four-option multiple-choice question about it. Five question types, grouped
into four subjects so that per-subject accuracy means something:

========  =======================================  =========================================
subject   question                                 options (canonical order)
========  =======================================  =========================================
Colour    ``<image 1> What colour is the largest   the colours in the picture plus random
          shape?``                                 fill, in palette order
Shapes    ``<image 1> What colour is the circle?`` same (square, triangle likewise)
Charts    ``<image 1> What colour is the tallest   the four bar colours, in palette order
          bar?`` / ``... shortest bar?``
Counting  ``<image 1> How many shapes are there?`` ``['1', '2', '3', '4']``
========  =======================================  =========================================

Options are always listed in a canonical order (colours in palette order, numbers ascending),
so the answer letter is a direct function of what is seen and of the listed options. Every
row carries ``skill: perception`` beside the MMMU fields. The demo's set now is
:mod:`mpsearch.tasks.synthetic` (benchmark ``synthetic``: perception and reasoning); this one
stays for the first demo model's recipe (``examples/train_demo_model_v1.py``).

Splits: ``train``, ``dev`` and ``validation`` come from disjoint seed streams, and on top of
that every (image, question) pair is assigned to exactly one split by a hash of its bytes: a
row whose hash falls in another split's bucket is redrawn. So validation never contains a pair
that train could produce, whatever the seeds and sizes.

Example:
    >>> rows = generate("dev", n=3, seed=0)
    >>> rows[0]["question"].startswith("<image 1>")
    True
    >>> sorted(set(r["subject"] for r in generate("validation", n=50))) == sorted(SUBJECTS)
    True
"""
from __future__ import annotations

import random
from typing import Any

from PIL import Image, ImageDraw

from mpsearch.tasks._scenes import BACKGROUND, COLOURS, PALETTE, SHAPES, SPLITS, bar_chart, draw_row, draw_stream
from mpsearch.tasks._scenes import draw_shape as _draw_shape

IMAGE_SIZE = 64

#: subject -> question types in it
SUBJECTS: dict[str, list[str]] = {
    "Colour": ["largest_colour"],
    "Shapes": ["shape_colour"],
    "Charts": ["tallest_bar", "shortest_bar"],
    "Counting": ["count"],
}
QUESTION_TYPES = [t for types in SUBJECTS.values() for t in types]
#: Every question here is one perception step (see mpsearch.tasks.synthetic for multi-step ones).
SKILLS = ("perception",)
SKILL_OF_TYPE: dict[str, str] = dict.fromkeys(QUESTION_TYPES, "perception")
SKILL_OF_SUBJECT: dict[str, str] = dict.fromkeys(SUBJECTS, "perception")
_SUBJECT_OF = {t: s for s, types in SUBJECTS.items() for t in types}
_IMG_TYPE = {"Colour": "Diagrams", "Shapes": "Diagrams", "Charts": "Charts", "Counting": "Diagrams"}
_DIFFICULTY = {"largest_colour": "Easy", "shape_colour": "Medium", "tallest_bar": "Easy",
               "shortest_bar": "Medium", "count": "Medium"}

DEFAULT_SIZES = {"train": 20000, "dev": 100, "validation": 500}

# Vocabulary the generator can emit (questions and options), for tokenizer building.
WORDS = sorted(set(
    "What colour is the largest shape ? circle square triangle tallest shortest bar "
    "How many shapes are there".split()
    + COLOURS + [str(i) for i in range(1, 5)]
))


# ----------------------------------------------------------------------------- drawing

def _cells(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """``n`` distinct cells of the 2x2 grid (each 32x32 px), one shape per cell: no overlaps."""
    cells = [(0, 0), (1, 0), (0, 1), (1, 1)]
    rng.shuffle(cells)
    return cells[:n]


def _place(rng: random.Random, cell: tuple[int, int], size: float) -> tuple[float, float]:
    half = IMAGE_SIZE / 4.0
    slack = max(0.0, (IMAGE_SIZE / 2.0 - size) / 2.0 - 1.0)
    cx = cell[0] * IMAGE_SIZE / 2.0 + half + rng.uniform(-slack, slack)
    cy = cell[1] * IMAGE_SIZE / 2.0 + half + rng.uniform(-slack, slack)
    return cx, cy


def _shapes_scene(rng: random.Random, shapes: list[tuple[str, str, float]]) -> tuple[Image.Image, list]:
    """The picture and what each 2x2-grid cell holds (row-major): ``(kind, colour)`` or None."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cells: list = [None] * 4
    for (kind, colour, size), cell in zip(shapes, _cells(rng, len(shapes))):
        cx, cy = _place(rng, cell, size)
        _draw_shape(draw, kind, cx, cy, size, PALETTE[colour])
        cells[cell[1] * 2 + cell[0]] = (kind, colour)
    return img, cells


def _colour_options(rng: random.Random, present: list[str]) -> list[str]:
    chosen = list(dict.fromkeys(present))[:4]
    rest = [c for c in COLOURS if c not in chosen]
    rng.shuffle(rest)
    chosen += rest[: 4 - len(chosen)]
    return [c for c in COLOURS if c in chosen]  # palette order


# ----------------------------------------------------------------------------- question types
def _largest_colour(rng: random.Random) -> tuple[Image.Image, str, list[str], str, dict]:
    n = rng.randint(2, 4)
    colours = rng.sample(COLOURS, n)
    big = rng.uniform(22, 29)
    sizes = [big] + [rng.uniform(9, big * 0.72) for _ in range(n - 1)]
    shapes = [(rng.choice(SHAPES), c, s) for c, s in zip(colours, sizes)]
    order = list(range(n))
    rng.shuffle(order)
    img, cells = _shapes_scene(rng, [shapes[i] for i in order])
    return img, "What colour is the largest shape?", _colour_options(rng, colours), colours[0], {
        "largest": colours[0], "count": n, "cells": cells}


def _shape_colour(rng: random.Random) -> tuple[Image.Image, str, list[str], str, dict]:
    n = rng.randint(2, 3)
    kinds = rng.sample(SHAPES, n)
    colours = rng.sample(COLOURS, n)
    sizes = [rng.uniform(16, 28) for _ in range(n)]
    shapes = list(zip(kinds, colours, sizes))
    img, cells = _shapes_scene(rng, shapes)
    target = rng.randrange(n)
    return img, f"What colour is the {kinds[target]}?", _colour_options(rng, colours), colours[target], {
        "count": n, "kinds": dict(zip(kinds, colours)), "cells": cells}


def _bars(rng: random.Random, which: str) -> tuple[Image.Image, str, list[str], str, dict]:
    return bar_chart(rng, which, IMAGE_SIZE, range(8, 57), min_gap=6, bar_width=(9, 12), margin=2, line_width=1)


def _count(rng: random.Random) -> tuple[Image.Image, str, list[str], str, dict]:
    n = rng.randint(1, 4)
    shapes = [(rng.choice(SHAPES), rng.choice(COLOURS), rng.uniform(10, 26)) for _ in range(n)]
    img, cells = _shapes_scene(rng, shapes)
    return img, "How many shapes are there?", ["1", "2", "3", "4"], str(n), {"count": n, "cells": cells}


_MAKERS = {
    "largest_colour": _largest_colour,
    "shape_colour": _shape_colour,
    "tallest_bar": lambda rng: _bars(rng, "tallest"),
    "shortest_bar": lambda rng: _bars(rng, "shortest"),
    "count": _count,
}


# ----------------------------------------------------------------------------- rows

def _make(split: str, seed: int, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]  # balanced subjects in every prefix
    subject = _SUBJECT_OF[qtype]
    return draw_row(f"mpsearch-synthetic/{split}/{seed}/{index}", f"synthetic_{split}_{seed}_{index}", split, qtype,
                    _MAKERS[qtype], subject, SKILL_OF_TYPE[qtype], _IMG_TYPE[subject], _DIFFICULTY[qtype])




def generate(split: str, n: int | None = None, seed: int = 0, start: int = 0) -> list[dict[str, Any]]:
    """Rows ``start .. start+n-1`` of the split's stream for ``seed`` (MMMU schema dicts).

    ``n`` defaults to 100 (dev), 500 (validation) or 20000 (train). Same arguments, same rows,
    images byte-identical.
    """
    return [row for row, _ in draw_stream(_make, DEFAULT_SIZES, split, n, seed, start)]


def generate_with_attributes(split: str, n: int | None = None, seed: int = 0,
                             start: int = 0) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Like :func:`generate`, with each row's scene attributes (what the picture holds).

    The attributes (``qtype``, ``answer_text`` and, where they apply, ``count``, ``largest``,
    ``kinds`` (kind -> colour), ``cells`` (the 2x2 grid row-major: ``(kind, colour)`` or None),
    ``tallest``, ``shortest``, ``bars`` (left to right: ``(colour, height rank)``, 0 = shortest)) are what the demo model's vision pretraining learns from.
    """
    return draw_stream(_make, DEFAULT_SIZES, split, n, seed, start)


__all__ = ["generate", "generate_with_attributes", "SUBJECTS", "SKILLS", "SKILL_OF_SUBJECT", "SKILL_OF_TYPE", "PALETTE", "COLOURS", "SHAPES",
           "QUESTION_TYPES", "SPLITS", "WORDS", "IMAGE_SIZE"]
