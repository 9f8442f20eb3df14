"""What the synthetic benchmarks share: the palette, the shapes, the split buckets, row drawing.

:mod:`mpsearch.tasks.synthetic` (the demo set, benchmark ``synthetic``) and
:mod:`mpsearch.tasks.synthetic_v1` (the first demo model's set, ``synthetic-v1``) draw their
pictures with these colours and shapes and their rows with :func:`draw_row`, which assigns every
(image, question) pair to exactly one split by a hash of its bytes.

Example:
    >>> COLOURS[:2], SHAPES
    (['red', 'orange'], ['circle', 'square', 'triangle'])
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

from PIL import Image, ImageDraw

#: Palette order is the canonical order of colour options.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 0),
    "yellow": (235, 215, 0),
    "green": (30, 170, 40),
    "blue": (30, 70, 230),
    "purple": (140, 40, 190),
}
COLOURS = list(PALETTE)
SHAPES = ["circle", "square", "triangle"]
BACKGROUND = (255, 255, 255)
SPLITS = ("train", "dev", "validation")
# Hash bucket (of 4) each split owns: validation 0, dev 1, train 2 and 3.
_BUCKETS = {"validation": (0,), "dev": (1,), "train": (2, 3)}


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, size: float, colour) -> None:
    """Draw one filled ``kind`` of diameter ``size`` px centred at ``(cx, cy)``."""
    h = size / 2.0
    if kind == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=colour)
    elif kind == "square":
        s = h * 0.9  # equal visual weight with the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - h), (cx - h, cy + h * 0.85), (cx + h, cy + h * 0.85)], fill=colour)
    else:  # pragma: no cover - internal
        raise ValueError(kind)


def bar_chart(rng: random.Random, which: str, size: int, heights: range, min_gap: int, bar_width: tuple[int, int],
              margin: int, line_width: int) -> tuple[Image.Image, str, list[str], str, dict[str, Any]]:
    """A ``size`` px chart of four bars in four colours and the question on its ``which``
    (``tallest`` / ``shortest``) bar: heights drawn from ``heights``, at least ``min_gap`` px
    apart; bar widths in ``bar_width``; the baseline ``2 * margin`` px above the bottom. Returns
    ``(image, question, options, answer, attributes)``, attributes ``tallest``, ``shortest`` and
    ``bars`` (left to right: ``(colour, height rank)``, 0 = shortest)."""
    colours = rng.sample(COLOURS, 4)
    while True:  # distinct heights, at least min_gap px apart
        hs = sorted(rng.sample(heights, 4))
        if min(b - a for a, b in zip(hs, hs[1:])) >= min_gap:
            break
    rng.shuffle(hs)
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    base = size - 2 * margin
    draw.line([(margin, base), (size - margin - 1, base)], fill=(90, 90, 90), width=line_width)
    width = rng.randint(*bar_width)
    gap = (size - 2 * margin - 4 * width) / 5.0
    for i, (c, h) in enumerate(zip(colours, hs)):
        x0 = margin + gap * (i + 1) + width * i
        draw.rectangle([x0, base - h, x0 + width - 1, base - 1], fill=PALETTE[c])
    tallest = colours[hs.index(max(hs))]
    shortest = colours[hs.index(min(hs))]
    answer = tallest if which == "tallest" else shortest
    options = [c for c in COLOURS if c in colours]
    ranks = [sorted(hs).index(h) for h in hs]  # 0 = shortest
    return img, f"What colour is the {which} bar?", options, answer, {
        "tallest": tallest, "shortest": shortest, "bars": list(zip(colours, ranks))}


def _bucket(img: Image.Image, question: str) -> int:
    h = hashlib.blake2b(img.tobytes(), digest_size=8)
    h.update(question.encode())
    return h.digest()[0] % 4


def draw_row(stream: str, row_id: str, split: str, qtype: str, make: Any, subject: str, skill: str,
             img_type: str, difficulty: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One MMMU-schema row drawn by ``make(rng)`` from ``random.Random(f"{stream}/{attempt}")``,
    redrawn until the picture and question hash into ``split``'s bucket; and its attributes.

    """
    attempt = 0
    while True:
        rng = random.Random(f"{stream}/{attempt}")
        img, question, options, answer, attrs = make(rng)
        if _bucket(img, question) in _BUCKETS[split]:
            break
        attempt += 1
    row = {
        "id": row_id,
        "question": f"<image 1> {question}",
        "options": repr(options),
        "answer": chr(ord("A") + options.index(answer)),
        "image_1": img,
        **{f"image_{i}": None for i in range(2, 8)},
        "subject": subject,
        "skill": skill,
        "question_type": "multiple-choice",
        "img_type": img_type,
        "topic_difficulty": difficulty,
        "explanation": "",
    }
    return row, {"qtype": qtype, "answer_text": answer, **attrs}

def draw_stream(make: Any, sizes: dict[str, int], split: str, n: int | None, seed: int,
                start: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Rows ``start .. start+n-1`` of ``split``'s stream as ``make(split, seed, index)`` draws
    them (``n`` None: ``sizes[split]``), with their attributes."""
    _check_split(split)
    n = sizes[split] if n is None else int(n)
    return [make(split, seed, i) for i in range(start, start + n)]

def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


__all__ = ["PALETTE", "COLOURS", "SHAPES", "BACKGROUND", "SPLITS", "bar_chart", "draw_shape", "draw_row", "draw_stream"]
