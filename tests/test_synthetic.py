"""The synthetic benchmark (the demo's): deterministic, MMMU schema, skills, answers that match the scene."""
from __future__ import annotations

import ast
import time

import pytest

from mpsearch.tasks import synthetic, synthetic_v1
from mpsearch.tasks.prompts import mmmu_prompt, to_messages

MMMU_FIELDS = {"id", "question", "options", "answer", "image_1", "image_2", "image_3", "image_4", "image_5",
               "image_6", "image_7", "subject", "question_type", "img_type", "topic_difficulty", "explanation"}


# What holds for both generated sets: the demo's and the first demo model's (synthetic-v1).
SETS = pytest.mark.parametrize("synthetic", [synthetic, synthetic_v1], ids=["synthetic", "synthetic-v1"])


def _key(row):
    return (row["image_1"].tobytes(), row["question"])


@SETS
def test_same_seed_same_rows_images_byte_identical(synthetic):
    a = synthetic.generate("dev", n=20, seed=3)
    b = synthetic.generate("dev", n=20, seed=3)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "image_1"} == {k: v for k, v in y.items() if k != "image_1"}
        assert x["image_1"].tobytes() == y["image_1"].tobytes()
    c = synthetic.generate("dev", n=20, seed=4)
    assert [_key(r) for r in a] != [_key(r) for r in c]


@SETS
def test_start_offset_is_a_window_of_the_same_stream(synthetic):
    whole = synthetic.generate("train", n=12, seed=0)
    tail = synthetic.generate("train", n=4, seed=0, start=8)
    assert [_key(r) for r in whole[8:]] == [_key(r) for r in tail]


def test_default_sizes():
    assert len(synthetic.generate("dev")) == 200
    t0 = time.perf_counter()
    val = synthetic.generate("validation")
    assert len(val) == 1008 >= 1000
    assert time.perf_counter() - t0 < 10.0
    assert len({r["id"] for r in val}) == 1008


@SETS
def test_schema_fields(synthetic):
    for row in synthetic.generate("dev", n=25):
        assert set(row) >= MMMU_FIELDS
        assert row["question"].startswith("<image 1> ")
        assert row["question_type"] == "multiple-choice"
        assert row["subject"] in synthetic.SUBJECTS
        assert row["skill"] == synthetic.SKILL_OF_SUBJECT[row["subject"]] in synthetic.SKILLS
        assert isinstance(row["options"], str)
        options = ast.literal_eval(row["options"])
        assert isinstance(options, list) and len(options) == 4 and len(set(options)) == 4
        assert row["answer"] in "ABCD"
        img = row["image_1"]
        assert img.mode == "RGB" and img.size == (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE)
        assert all(row[f"image_{i}"] is None for i in range(2, 8))
        assert isinstance(row["explanation"], str)
        # The prompt machinery reads it: one image slot, at the start.
        messages, images = to_messages(row)
        assert messages[0]["content"][0] == {"type": "image"} and len(images) == 1
        assert "(D)" in mmmu_prompt(row)


def test_every_subject_present_and_answers_spread():
    rows = synthetic.generate("validation", n=100)
    assert {r["subject"] for r in rows} == set(synthetic.SUBJECTS)
    assert {r["answer"] for r in rows} == set("ABCD")
    # every question type answers with every letter, none more than half the time (no letter prior)
    from collections import Counter
    by_type: dict = {}
    for row, attrs in synthetic.generate_with_attributes("validation", n=900):
        by_type.setdefault(attrs["qtype"], Counter())[row["answer"]] += 1
    assert set(by_type) == set(synthetic.QUESTION_TYPES)
    for qtype, c in by_type.items():
        assert max(c.values()) <= 0.5 * sum(c.values()), (qtype, c)


def test_skills_split_perception_and_reasoning():
    assert set(synthetic.SKILL_OF_TYPE.values()) == set(synthetic.SKILLS)
    reasoning = [t for t, s in synthetic.SKILL_OF_TYPE.items() if s == "reasoning"]
    assert len(reasoning) >= 3
    rows = synthetic.generate("validation", n=90)
    share = sum(r["skill"] == "reasoning" for r in rows) / len(rows)
    assert share == len(reasoning) / len(synthetic.QUESTION_TYPES)


def test_options_in_canonical_order():
    for row in synthetic.generate("dev", n=90, seed=1):
        options = ast.literal_eval(row["options"])
        if row["subject"] in ("Counting", "Arithmetic", "Addition"):
            assert options == sorted(options, key=int) and all(1 <= int(o) <= 8 for o in options)
        else:
            assert all(o in synthetic.COLOURS for o in options)
            assert options == sorted(options, key=synthetic.COLOURS.index)


def test_answers_match_the_scene():
    for row, attrs in synthetic.generate_with_attributes("dev", n=90):
        options = ast.literal_eval(row["options"])
        assert options[ord(row["answer"]) - ord("A")] == attrs["answer_text"]
        if attrs["qtype"] == "count":
            assert attrs["answer_text"] == str(attrs["count"])
        if "cells" in attrs:
            assert sum(c is not None for c in attrs["cells"]) == attrs["count"]
            assert sum(attrs["colour_counts"].values()) == attrs["count"]
        cells = attrs.get("cells") or []
        grid = {i: c for i, c in enumerate(cells) if c is not None}
        q = row["question"]
        if attrs["qtype"] == "most_colour":
            counts = attrs["colour_counts"]
            assert counts[attrs["answer_text"]] > max(v for c, v in counts.items() if c != attrs["answer_text"])
        if attrs["qtype"] == "count_difference":
            words = q.split()
            a, b = words[words.index("more") + 1], words[words.index("than") + 1]
            assert attrs["colour_counts"][a] - attrs["colour_counts"][b] == int(attrs["answer_text"])
        if attrs["qtype"] in ("more_of", "count_sum"):
            words = q.rstrip("?").split()
            a, b = words[words.index("or") - 1 - (attrs["qtype"] == "more_of")], words[words.index("or") + 1]
            na, nb = attrs["colour_counts"][a], attrs["colour_counts"][b]
            if attrs["qtype"] == "more_of":
                assert na != nb and attrs["answer_text"] == (a if na > nb else b)
                assert a in options and b in options
            else:
                assert int(attrs["answer_text"]) == na + nb
                assert [int(o) for o in options] == list(range(int(options[0]), int(options[0]) + 4))
        if attrs["qtype"] == "largest_colour":
            big = max(grid, key=lambda i: grid[i][2])
            assert all(grid[i][2] < grid[big][2] for i in grid if i != big)
            assert grid[big][1] == attrs["largest"]
        if "bars" in attrs:
            ranks = dict(attrs["bars"])
            assert ranks[attrs["tallest"]] == 3 and ranks[attrs["shortest"]] == 0


@SETS
def test_validation_never_overlaps_train(synthetic):
    val = {_key(r) for r in synthetic.generate("validation", n=500)}
    train = {_key(r) for r in synthetic.generate("train", n=2000)}
    train |= {_key(r) for r in synthetic.generate("train", n=500, seed=1000)}  # the vision-pretraining stream
    dev = {_key(r) for r in synthetic.generate("dev", n=100)}
    assert not val & train
    assert not dev & train
    assert not val & dev


@SETS
def test_unknown_split(synthetic):
    with pytest.raises(ValueError):
        synthetic.generate("test", n=1)
