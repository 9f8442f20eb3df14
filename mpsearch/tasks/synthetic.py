"""The demo's benchmark (``load_benchmark("synthetic")``): perception and reasoning, MMMU schema.

What the shipped demo model (``mpsearch/demo``, trained by ``examples/train_demo_model.py``)
answers. Its perception-only predecessor is :mod:`mpsearch.tasks.synthetic_v1`.

Every row is drawn deterministically from ``(split, seed, index)``: a 128x128 RGB picture made
with PIL and a multiple-choice question about it. Shapes sit in an 8x8 grid of 16-px cells, one
per cell and inside it (no overlaps; a cell is one 16-px patch of the demo model's vision
tower); charts hold four bars. Nine question types in eight subjects, each
with a *skill*: ``perception`` (one look: a colour, a kind, a count) or ``reasoning`` (several
steps over what is seen: count the shapes of two named colours then compare, subtract or add
the two counts; count every colour then take the most frequent):

==========  ==========  ===========================================================  ==================
skill       subject     question                                                     options
==========  ==========  ===========================================================  ==================
perception  Colour      ``What colour is the largest shape?``                        4 colours
perception  Shapes      ``What colour is the circle?`` (square, triangle likewise)   4 colours
perception  Charts      ``What colour is the tallest bar?`` / ``... shortest bar?``  the 4 bar colours
perception  Counting    ``How many shapes are there?`` (1-8)                         4 numbers
reasoning   Comparison  ``Are there more red shapes or blue shapes?``                 the 2 named + 2 colours
reasoning   Frequency   ``Which colour appears most often?``                         4 colours
reasoning   Arithmetic  ``How many more red shapes than blue shapes are there?``     1, 2, 3, 4
reasoning   Addition    ``How many red or blue shapes are there?``                   4 consecutive numbers
==========  ==========  ===========================================================  ==================

Options are always listed in a canonical order (colours in palette order, numbers ascending), so the answer letter is a function of what is seen and of the options.
Each row carries ``skill`` beside the MMMU fields; scoring reports accuracy per skill.

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
    >>> sorted(set(r["skill"] for r in generate("validation", n=50)))
    ['perception', 'reasoning']
"""
from __future__ import annotations

import random
from typing import Any, Callable

from PIL import Image, ImageDraw

from mpsearch.tasks._scenes import BACKGROUND, COLOURS, PALETTE, SHAPES, SPLITS, bar_chart, draw_row, draw_stream
from mpsearch.tasks._scenes import draw_shape as _draw_shape

#: Version of the generator: a change of pictures or questions changes it.
VERSION = 3
IMAGE_SIZE = 128
GRID = 8
CELL = IMAGE_SIZE // GRID
SKILLS = ("perception", "reasoning")

#: subject -> question types in it
SUBJECTS: dict[str, list[str]] = {
    "Colour": ["largest_colour"],
    "Shapes": ["shape_colour"],
    "Charts": ["tallest_bar", "shortest_bar"],
    "Counting": ["count"],
    "Comparison": ["more_of"],
    "Frequency": ["most_colour"],
    "Arithmetic": ["count_difference"],
    "Addition": ["count_sum"],
}
#: question type -> skill
SKILL_OF_TYPE: dict[str, str] = {
    "largest_colour": "perception", "shape_colour": "perception", "tallest_bar": "perception",
    "shortest_bar": "perception", "count": "perception",
    "most_colour": "reasoning", "count_difference": "reasoning", "more_of": "reasoning",
    "count_sum": "reasoning",
}
#: subject -> skill
SKILL_OF_SUBJECT: dict[str, str] = {s: SKILL_OF_TYPE[types[0]] for s, types in SUBJECTS.items()}
# Interleaved so that every prefix of a split is balanced over types (and so over skills).
QUESTION_TYPES = ["largest_colour", "most_colour", "shape_colour", "count_difference", "tallest_bar",
                  "more_of", "count", "count_sum", "shortest_bar"]
_SUBJECT_OF = {t: s for s, types in SUBJECTS.items() for t in types}
_IMG_TYPE = {s: ("Charts" if s == "Charts" else "Diagrams") for s in SUBJECTS}
_DIFFICULTY = {t: ("Hard" if SKILL_OF_TYPE[t] == "reasoning" else "Easy") for t in QUESTION_TYPES}

DEFAULT_SIZES = {"train": 200000, "dev": 200, "validation": 1008}

# Vocabulary the generator can emit (questions and options), for tokenizer building.
WORDS = sorted(set(
    "What colour is the largest shape ? circle square triangle tallest shortest bar "
    "How many shapes are there Which appears most often more than Where relative to "
    "or Are".split()
    + COLOURS + [str(i) for i in range(1, 9)]
))

Cell = tuple  # (kind, colour, size_px)


# ----------------------------------------------------------------------------- drawing
def _render(rng: random.Random, cells: list[Cell | None]) -> Image.Image:
    """The picture of the 8x8 grid (row-major ``cells``): each shape jittered inside its cell."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, cell in enumerate(cells):
        if cell is None:
            continue
        kind, colour, size = cell
        slack = max(0.0, (CELL - size) / 2.0 - 1.0)
        cx = (i % GRID) * CELL + CELL / 2.0 + rng.uniform(-slack, slack)
        cy = (i // GRID) * CELL + CELL / 2.0 + rng.uniform(-slack, slack)
        _draw_shape(draw, kind, cx, cy, size, PALETTE[colour])
    return img


def _scatter(rng: random.Random, shapes: list[Cell], taken: dict[int, Cell] | None = None) -> list[Cell | None]:
    """Place ``shapes`` in random free cells (``taken`` cells already hold a shape)."""
    cells: list[Cell | None] = [None] * (GRID * GRID)
    for i, c in (taken or {}).items():
        cells[i] = c
    free = [i for i in range(GRID * GRID) if cells[i] is None]
    rng.shuffle(free)
    for shape, i in zip(shapes, free):
        cells[i] = shape
    return cells


def _size(rng: random.Random, lo: float = 6, hi: float = 12) -> float:
    return rng.uniform(lo, hi)


def _colour_options(rng: random.Random, answer: str, present: list[str]) -> list[str]:
    """The answer, up to three other colours of the picture, random fill; palette order."""
    others = [c for c in dict.fromkeys(present) if c != answer]
    rng.shuffle(others)
    chosen = [answer] + others[:3]
    rest = [c for c in COLOURS if c not in chosen]
    rng.shuffle(rest)
    chosen += rest[: 4 - len(chosen)]
    return [c for c in COLOURS if c in chosen]


def _scene_attrs(cells: list[Cell | None]) -> dict[str, Any]:
    present = [c for c in cells if c is not None]
    return {"cells": cells, "count": len(present),
            "colour_counts": {c: sum(1 for s in present if s[1] == c) for c in COLOURS}}


Made = tuple  # (image, question, options, answer_text, attrs)


# ----------------------------------------------------------------------------- perception
def _largest_colour(rng: random.Random) -> Made:
    n = rng.randint(3, 6)
    colours = [rng.choice(COLOURS) for _ in range(n)]
    big = rng.uniform(12, 14.5)
    shapes = [(rng.choice(SHAPES), colours[0], big)]
    shapes += [(rng.choice(SHAPES), c, rng.uniform(5, big * 0.65)) for c in colours[1:]]
    cells = _scatter(rng, shapes)
    img = _render(rng, cells)
    return img, "What colour is the largest shape?", _colour_options(rng, colours[0], colours), colours[0], {
        **_scene_attrs(cells), "largest": colours[0]}


def _shape_colour(rng: random.Random) -> Made:
    n = rng.randint(2, 3)
    kinds = rng.sample(SHAPES, n)
    colours = rng.sample(COLOURS, n)
    cells = _scatter(rng, [(k, c, _size(rng, 8, 14)) for k, c in zip(kinds, colours)])
    img = _render(rng, cells)
    target = rng.randrange(n)
    return img, f"What colour is the {kinds[target]}?", _colour_options(rng, colours[target], colours), \
        colours[target], _scene_attrs(cells)


def _count(rng: random.Random) -> Made:
    n = rng.randint(1, 8)
    cells = _scatter(rng, [(rng.choice(SHAPES), rng.choice(COLOURS), _size(rng)) for _ in range(n)])
    img = _render(rng, cells)
    others = [str(k) for k in range(1, 9) if k != n]
    options = sorted(rng.sample(others, 3) + [str(n)], key=int)
    return img, "How many shapes are there?", options, str(n), _scene_attrs(cells)


def _bars(rng: random.Random, which: str) -> Made:
    return bar_chart(rng, which, IMAGE_SIZE, range(14, 117), min_gap=10, bar_width=(16, 22), margin=3, line_width=2)


# ----------------------------------------------------------------------------- reasoning
def _most_colour(rng: random.Random) -> Made:
    counts = sorted(rng.sample([1, 2, 3, 4], 3), reverse=True)
    colours = rng.sample(COLOURS, 3)
    shapes = [(rng.choice(SHAPES), c, _size(rng)) for c, k in zip(colours, counts) for _ in range(k)]
    rng.shuffle(shapes)
    cells = _scatter(rng, shapes)
    img = _render(rng, cells)
    return img, "Which colour appears most often?", _colour_options(rng, colours[0], colours), colours[0], \
        _scene_attrs(cells)


def _count_difference(rng: random.Random) -> Made:
    a, b, *rest = rng.sample(COLOURS, 4)
    nb = rng.randint(1, 3)
    d = rng.randint(1, 4)
    na = nb + d
    extra = rng.randint(0, 2)
    shapes = [(rng.choice(SHAPES), a, _size(rng)) for _ in range(na)]
    shapes += [(rng.choice(SHAPES), b, _size(rng)) for _ in range(nb)]
    shapes += [(rng.choice(SHAPES), rng.choice(rest), _size(rng)) for _ in range(extra)]
    rng.shuffle(shapes)
    cells = _scatter(rng, shapes)
    img = _render(rng, cells)
    return img, f"How many more {a} shapes than {b} shapes are there?", ["1", "2", "3", "4"], str(d), \
        _scene_attrs(cells)


def _two_colours(rng: random.Random, differ: bool = True, hi: int = 4):
    """Two named colours with ``na`` / ``nb`` shapes (``na != nb`` if ``differ``), and 0-2 shapes
    of other colours: the scene of a question about two counts."""
    a, b, *rest = rng.sample(COLOURS, 4)
    while True:
        na, nb = rng.randint(1, hi), rng.randint(1, hi)
        if not differ or na != nb:
            break
    shapes = [(rng.choice(SHAPES), a, _size(rng)) for _ in range(na)]
    shapes += [(rng.choice(SHAPES), b, _size(rng)) for _ in range(nb)]
    shapes += [(rng.choice(SHAPES), rng.choice(rest), _size(rng)) for _ in range(rng.randint(0, 2))]
    rng.shuffle(shapes)
    cells = _scatter(rng, shapes)
    return a, b, na, nb, cells, _render(rng, cells)


def _more_of(rng: random.Random) -> Made:
    a, b, na, nb, cells, img = _two_colours(rng)
    answer = a if na > nb else b
    present = [c[1] for c in cells if c is not None]
    # both named colours are options, with two more (of the picture where it has them)
    others = [c for c in dict.fromkeys(present) if c not in (a, b)]
    rng.shuffle(others)
    chosen = [a, b] + others[:2]
    rest = [c for c in COLOURS if c not in chosen]
    rng.shuffle(rest)
    chosen += rest[: 4 - len(chosen)]
    return img, f"Are there more {a} shapes or {b} shapes?", [c for c in COLOURS if c in chosen], answer, \
        _scene_attrs(cells)


def _count_sum(rng: random.Random) -> Made:
    a, b, na, nb, cells, img = _two_colours(rng, differ=False)
    total = na + nb
    lo = rng.randint(max(1, total - 3), min(total, 5))  # four consecutive numbers holding the answer
    return img, f"How many {a} or {b} shapes are there?", [str(k) for k in range(lo, lo + 4)], str(total), \
        _scene_attrs(cells)


_MAKERS: dict[str, Callable[[random.Random], Made]] = {
    "largest_colour": _largest_colour,
    "shape_colour": _shape_colour,
    "tallest_bar": lambda rng: _bars(rng, "tallest"),
    "shortest_bar": lambda rng: _bars(rng, "shortest"),
    "count": _count,
    "most_colour": _most_colour,
    "count_difference": _count_difference,
    "more_of": _more_of,
    "count_sum": _count_sum,
}


# ----------------------------------------------------------------------------- rows
def _make(split: str, seed: int, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]  # balanced types in every prefix
    subject = _SUBJECT_OF[qtype]
    return draw_row(f"mpsearch-synthetic-v{VERSION}/{split}/{seed}/{index}",
                    f"synthetic_{split}_{seed}_{index}", split, qtype, _MAKERS[qtype], subject,
                    SKILL_OF_TYPE[qtype], _IMG_TYPE[subject], _DIFFICULTY[qtype])


def generate(split: str, n: int | None = None, seed: int = 0, start: int = 0) -> list[dict[str, Any]]:
    """Rows ``start .. start+n-1`` of the split's stream for ``seed`` (MMMU schema dicts).

    ``n`` defaults to 200 (dev), 1008 (validation) or 200000 (train). Same arguments, same rows,
    images byte-identical.
    """
    return [row for row, _ in draw_stream(_make, DEFAULT_SIZES, split, n, seed, start)]


def generate_with_attributes(split: str, n: int | None = None, seed: int = 0,
                             start: int = 0) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Like :func:`generate`, with each row's scene attributes (what the picture holds).

    The attributes: ``qtype``, ``answer_text`` and, where they apply, ``cells`` (the 8x8 grid
    row-major: ``(kind, colour, size_px)`` or None), ``count``, ``colour_counts`` (colour ->
    number of shapes), ``largest`` (its colour), ``tallest``, ``shortest``,
    ``bars`` (left to right: ``(colour, height rank)``, 0 = shortest). They are what the demo
    model's vision pretraining learns from.
    """
    return draw_stream(_make, DEFAULT_SIZES, split, n, seed, start)


__all__ = ["generate", "generate_with_attributes", "SUBJECTS", "SKILLS", "SKILL_OF_SUBJECT", "SKILL_OF_TYPE",
           "PALETTE", "COLOURS", "SHAPES", "QUESTION_TYPES", "SPLITS", "WORDS", "IMAGE_SIZE",
           "VERSION"]
