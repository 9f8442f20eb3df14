"""The synthetic-v1 benchmark (the first demo model's): its sizes, subjects, canonical options and answers
(determinism, schema and disjoint splits are checked for both sets in test_synthetic.py)."""
from __future__ import annotations

import ast
import time

from mpsearch.tasks import synthetic_v1 as synthetic


def test_default_sizes():
    assert len(synthetic.generate("dev")) == 100
    t0 = time.perf_counter()
    val = synthetic.generate("validation")
    assert len(val) == 500
    assert time.perf_counter() - t0 < 5.0
    assert len({r["id"] for r in val}) == 500


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