"""The synthetic-v1 benchmark (the first demo model's): deterministic, MMMU schema, canonical options, disjoint splits."""
from __future__ import annotations

import ast
import time

import pytest

from mpsearch.tasks import synthetic_v1 as synthetic
from mpsearch.tasks.prompts import mmmu_prompt, to_messages

MMMU_FIELDS = {"id", "question", "options", "answer", "image_1", "image_2", "image_3", "image_4", "image_5",
               "image_6", "image_7", "subject", "question_type", "img_type", "topic_difficulty", "explanation"}


def _key(row):
    return (row["image_1"].tobytes(), row["question"])


def test_same_seed_same_rows_images_byte_identical():
    a = synthetic.generate("dev", n=20, seed=3)
    b = synthetic.generate("dev", n=20, seed=3)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "image_1"} == {k: v for k, v in y.items() if k != "image_1"}
        assert x["image_1"].tobytes() == y["image_1"].tobytes()
    c = synthetic.generate("dev", n=20, seed=4)
    assert [_key(r) for r in a] != [_key(r) for r in c]


def test_start_offset_is_a_window_of_the_same_stream():
    whole = synthetic.generate("train", n=12, seed=0)
    tail = synthetic.generate("train", n=4, seed=0, start=8)
    assert [_key(r) for r in whole[8:]] == [_key(r) for r in tail]


def test_default_sizes():
    assert len(synthetic.generate("dev")) == 100
    t0 = time.perf_counter()
    val = synthetic.generate("validation")
    assert len(val) == 500
    assert time.perf_counter() - t0 < 5.0
    assert len({r["id"] for r in val}) == 500


def test_schema_fields():
    for row in synthetic.generate("dev", n=25):
        assert set(row) >= MMMU_FIELDS
        assert row["question"].startswith("<image 1> ")
        assert row["question_type"] == "multiple-choice"
        assert row["subject"] in synthetic.SUBJECTS
        assert row["skill"] == "perception"  # every question here is one perception step
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


def test_options_in_canonical_order():
    for row in synthetic.generate("dev", n=50, seed=1):
        options = ast.literal_eval(row["options"])
        if row["subject"] == "Counting":
            assert options == ["1", "2", "3", "4"]
        else:
            assert all(o in synthetic.COLOURS for o in options)
            assert options == sorted(options, key=synthetic.COLOURS.index)


def test_answers_match_the_scene():
    for row, attrs in synthetic.generate_with_attributes("dev", n=30):
        options = ast.literal_eval(row["options"])
        assert options[ord(row["answer"]) - ord("A")] == attrs["answer_text"]
        if attrs["qtype"] == "count":
            assert attrs["answer_text"] == str(attrs["count"])
        if "cells" in attrs:
            assert sum(c is not None for c in attrs["cells"]) == attrs["count"]
        if "bars" in attrs:
            ranks = dict(attrs["bars"])
            assert ranks[attrs["tallest"]] == 3 and ranks[attrs["shortest"]] == 0


def test_validation_never_overlaps_train():
    val = {_key(r) for r in synthetic.generate("validation", n=500)}
    train = {_key(r) for r in synthetic.generate("train", n=2000)}
    train |= {_key(r) for r in synthetic.generate("train", n=500, seed=1000)}  # the vision-pretraining stream
    dev = {_key(r) for r in synthetic.generate("dev", n=100)}
    assert not val & train
    assert not dev & train
    assert not val & dev


def test_unknown_split():
    with pytest.raises(ValueError):
        synthetic.generate("test", n=1)
