"""load_benchmark on datasets written here in the real schemas (MMMU, SEED-Bench), saved with
``datasets`` and read back through the path users take. Nothing touches the network."""
from __future__ import annotations

import time

import pytest

datasets = pytest.importorskip("datasets")
from datasets import Dataset, DatasetDict, Features, Image, List, Value  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from mpsearch.errors import MpsError  # noqa: E402
from mpsearch.tasks import base, load_benchmark  # noqa: E402
from mpsearch.tasks.prompts import mmmu_prompt, to_messages  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, and an empty hub cache of our own."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


MMMU_FEATURES = Features({
    "id": Value("string"), "question": Value("string"), "options": Value("string"),
    "explanation": Value("string"),
    **{f"image_{i}": Image() for i in range(1, 8)},
    "img_type": Value("string"), "answer": Value("string"), "topic_difficulty": Value("string"),
    "question_type": Value("string"), "subfield": Value("string"),
})


def img(colour=(200, 10, 10)):
    return PILImage.new("RGB", (8, 8), colour)


def mmmu_rows(subject: str, split: str, n: int, withheld: bool = False) -> list[dict]:
    rows = []
    for k in range(1, n + 1):
        open_q = k == n and n > 1  # the last question of a subject is open
        rows.append({
            "id": f"{split}_{subject}_{k}",
            "question": f"<image 1> Question {k} of {subject}? Compare with <image 2>." if k == 1
            else f"<image 1> Question {k} of {subject}?",
            "options": "[]" if open_q else "['red', 'green', 'blue sky', 'yellow']",
            "explanation": "",
            "image_1": img(),
            "image_2": img((0, 0, 200)) if k == 1 else None,
            **{f"image_{i}": None for i in range(3, 8)},
            "img_type": "['Diagrams']",
            "answer": "?" if withheld else ("['3', 'three']" if open_q else "ABCD"[k % 4]),
            "topic_difficulty": "Easy",
            "question_type": "open" if open_q else "multiple-choice",
            "subfield": "Sub",
        })
    return rows


def mmmu_dict(subject: str, sizes=(2, 3, 2)) -> DatasetDict:
    return DatasetDict({
        "dev": Dataset.from_list(mmmu_rows(subject, "dev", sizes[0]), features=MMMU_FEATURES),
        "validation": Dataset.from_list(mmmu_rows(subject, "validation", sizes[1]), features=MMMU_FEATURES),
        "test": Dataset.from_list(mmmu_rows(subject, "test", sizes[2], withheld=True), features=MMMU_FEATURES),
    })


@pytest.fixture
def mmmu_per_subject(tmp_path):
    root = tmp_path / "mmmu"
    for s in ("Art", "Math", "Energy_and_Power"):
        mmmu_dict(s).save_to_disk(str(root / s))
    return root


# --------------------------------------------------------------------------- MMMU layouts
def test_mmmu_per_subject_dirs(mmmu_per_subject):
    b = load_benchmark("mmmu", "validation", path=mmmu_per_subject)
    assert (b.name, b.split, len(b)) == ("mmmu", "validation", 9)
    assert b.source == str(mmmu_per_subject)
    assert b.subjects == ["Art", "Energy_and_Power", "Math"]
    assert b.has_answers
    row = b[0]
    assert row["subject"] == "Art" and row["id"] == "validation_Art_1"
    assert isinstance(row["image_1"], PILImage.Image) and isinstance(row["image_2"], PILImage.Image)
    q = b.question(0)
    assert q.options == ["red", "green", "blue sky", "yellow"] and q.choices == ["A", "B", "C", "D"]
    assert q.answer == "B" and q.is_multiple_choice
    q = b.question(2)  # the open question: answer string holding a list -> list
    assert q.question_type == "open" and q.options == [] and q.answer == ["3", "three"]
    # both images reach the prompt, in placeholder order
    messages, images = to_messages(row)
    assert len(images) == 2 and [c["type"] for c in messages[0]["content"]][:1] == ["image"]
    assert sum(1 for _ in b) == 9


def test_mmmu_combined_dataset_with_and_without_subject_field(tmp_path):
    rows = mmmu_rows("Art", "validation", 3) + mmmu_rows("Art_Theory", "validation", 2)
    with_subject = [dict(r, subject=r["id"].split("_", 1)[1].rsplit("_", 1)[0]) for r in rows]
    feats = Features({**MMMU_FEATURES, "subject": Value("string")})
    DatasetDict({"validation": Dataset.from_list(with_subject, features=feats)}).save_to_disk(str(tmp_path / "a"))
    b = load_benchmark("mmmu", "validation", path=tmp_path / "a")
    assert b.subjects == ["Art", "Art_Theory"] and len(b) == 5
    # no subject field: read from the id like main_eval_only.py ("_".join(id.split("_")[1:-1]))
    DatasetDict({"validation": Dataset.from_list(rows, features=MMMU_FEATURES)}).save_to_disk(str(tmp_path / "b"))
    b = load_benchmark("mmmu", "validation", path=tmp_path / "b")
    assert [b.question(i).subject for i in range(5)] == ["Art"] * 3 + ["Art_Theory"] * 2
    # a single saved Dataset is taken as the split asked for
    Dataset.from_list(rows, features=MMMU_FEATURES).save_to_disk(str(tmp_path / "c"))
    assert len(load_benchmark("mmmu", "dev", path=tmp_path / "c")) == 5


def test_mmmu_hub_cache_snapshot(monkeypatch, tmp_path):
    # The hub repository layout: <Subject>/<split>-00000-of-00001.parquet in a cache snapshot.
    from huggingface_hub import constants

    snap = tmp_path / "hub-cache" / "datasets--MMMU--MMMU" / "snapshots" / "0123abc"
    for s in ("Art", "Math"):
        (snap / s).mkdir(parents=True)
        Dataset.from_list(mmmu_rows(s, "validation", 3), features=MMMU_FEATURES).to_parquet(
            str(snap / s / "validation-00000-of-00001.parquet"))
    assert constants.HF_HUB_CACHE == str(tmp_path / "hub-cache")
    b = load_benchmark("mmmu", "validation")
    assert b.source == "hub cache MMMU/MMMU" and b.subjects == ["Art", "Math"] and len(b) == 6
    assert isinstance(b[0]["image_1"], PILImage.Image)
    b = load_benchmark("mmmu", "validation", subjects=["math"])
    assert b.subjects == ["Math"]
    # the same snapshot passed as path= (a `huggingface-cli download` folder)
    assert len(load_benchmark("mmmu", "validation", path=snap)) == 6


def test_mmmu_test_split_loads_but_is_refused_for_scoring(mmmu_per_subject):
    b = load_benchmark("mmmu", "test", path=mmmu_per_subject)
    assert len(b) == 6 and not b.has_answers and b.n_withheld == 6
    with pytest.raises(MpsError, match=r"answers are withheld \(6 of 6 rows"):
        b.require_answers()


def test_mmmu_subjects_limit_and_errors(mmmu_per_subject):
    b = load_benchmark("mmmu", "validation", path=mmmu_per_subject, subjects=["art", "ep"])
    assert b.subjects == ["Art", "Energy_and_Power"]
    # limit: round-robin over subjects
    b = load_benchmark("mmmu", "validation", path=mmmu_per_subject, limit=4)
    assert [b.question(i).id for i in range(4)] == [
        "validation_Art_1", "validation_Energy_and_Power_1", "validation_Math_1", "validation_Art_2"]
    assert any("round-robin" in n for n in b.notes)
    with pytest.raises(MpsError, match="'Chemistryy' is not an MMMU subject; valid: Accounting"):
        load_benchmark("mmmu", "validation", path=mmmu_per_subject, subjects=["Chemistryy"])
    with pytest.raises(MpsError, match=r"0 questions for subjects \['Chemistry'\]"):
        load_benchmark("mmmu", "validation", path=mmmu_per_subject, subjects=["Chemistry"])
    with pytest.raises(MpsError, match="split 'train' does not exist; valid: dev, validation, test"):
        load_benchmark("mmmu", "train", path=mmmu_per_subject)
    with pytest.raises(MpsError, match="limit=0"):
        load_benchmark("mmmu", "validation", path=mmmu_per_subject, limit=0)
    with pytest.raises(MpsError, match="benchmark 'mmlu' unknown; valid: mmmu, seedbench, synthetic"):
        load_benchmark("mmlu", "validation")


def test_local_dir_errors(tmp_path):
    with pytest.raises(MpsError, match="no such directory"):
        load_benchmark("mmmu", "validation", path=tmp_path / "nope" / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MpsError, match="no split 'validation' found; accepted layouts"):
        load_benchmark("mmmu", "validation", path=tmp_path / "empty")
    DatasetDict({"dev": Dataset.from_list(mmmu_rows("Art", "dev", 2), features=MMMU_FEATURES)}).save_to_disk(
        str(tmp_path / "devonly"))
    with pytest.raises(MpsError, match=r"no split 'validation'; it has \['dev'\]"):
        load_benchmark("mmmu", "validation", path=tmp_path / "devonly")
    bad = [{k: v for k, v in r.items() if k != "question_type"} for r in mmmu_rows("Art", "dev", 2)]
    DatasetDict({"dev": Dataset.from_list(bad)}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(MpsError, match=r"field\(s\) \['question_type'\] missing"):
        load_benchmark("mmmu", "dev", path=tmp_path / "bad")


def test_missing_data_says_where_it_looked_and_fails_fast():
    t0 = time.monotonic()
    with pytest.raises(MpsError) as exc:
        load_benchmark("mmmu", "validation", subjects=["Art"])
    msg = str(exc.value)
    assert time.monotonic() - t0 < 30
    assert "\n" not in msg
    for needle in ("mmmu split 'validation' not found", "hub MMMU/MMMU (offline mode", "hub cache",
                   "datasets cache", "path=DIR", "--data DIR"):
        assert needle in msg
    with pytest.raises(MpsError, match="seedbench split 'test' not found.*lmms-lab/SEED-Bench"):
        load_benchmark("seedbench", "test")


def test_unreachable_hub_goes_cache_only_fast(monkeypatch):
    # Online mode, but the endpoint refuses connections: no minutes of retries, cache only.
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    assert not base.hub_reachable(timeout=1.0)
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="unreachable"), pytest.raises(MpsError, match=r"hub unreachable"):
        load_benchmark("mmmu", "dev", subjects=["Art"])
    assert time.monotonic() - t0 < 30
    assert datasets.config.HF_HUB_OFFLINE is False  # restored


# --------------------------------------------------------------------------- SEED-Bench
SEED_FEATURES = Features({
    "answer": Value("string"), "choice_a": Value("string"), "choice_b": Value("string"),
    "choice_c": Value("string"), "choice_d": Value("string"), "data_id": Value("string"),
    "data_type": Value("string"), "question": Value("string"), "question_id": Value("string"),
    "question_type_id": Value("int16"), "image": List(Image()), "segment": List(Value("int64")),
})


def seed_rows() -> list[dict]:
    rows = []
    for k, (qtype, dtype) in enumerate([(1, "image"), (9, "image"), (10, "video"), (5, "image"), (12, "video")]):
        rows.append({
            "answer": "ABCD"[k % 4], "choice_a": "a cat", "choice_b": "a dog", "choice_c": "two", "choice_d": "none",
            "data_id": f"{k}.jpg", "data_type": dtype, "question": f"What is shown {k}?",
            "question_id": str(100 + k), "question_type_id": qtype,
            "image": [img()] if dtype == "image" else [img(), img(), img()],
            "segment": None,
        })
    return rows


def test_seedbench_maps_to_mmmu_schema_and_skips_video(tmp_path):
    DatasetDict({"test": Dataset.from_list(seed_rows(), features=SEED_FEATURES)}).save_to_disk(str(tmp_path / "seed"))
    b = load_benchmark("seedbench", "test", path=tmp_path / "seed")
    assert len(b) == 3 and b.has_answers
    assert b.notes == ["skipped 2 video questions"]
    assert b.subjects == ["Scene Understanding", "Text Understanding", "Instances Counting"]
    row = b[0]
    assert row["question"] == "<image 1> What is shown 0?"
    assert row["options"] == "['a cat', 'a dog', 'two', 'none']"
    assert row["answer"] == "A" and row["question_type"] == "multiple-choice" and row["id"] == "100"
    assert isinstance(row["image_1"], PILImage.Image) and row["image_2"] is None
    assert b.question(1).answer == "B" and b.question(1).options[0] == "a cat"
    assert mmmu_prompt(row) == ("<image 1> What is shown 0?\n(A) a cat\n(B) a dog\n(C) two\n(D) none\n\n"
                                "Answer with the option's letter from the given choices directly.")
    b = load_benchmark("seedbench", "test", path=tmp_path / "seed", subjects=["text_understanding", "5"])
    assert b.subjects == ["Text Understanding", "Instances Counting"]
    with pytest.raises(MpsError, match="not a SEED-Bench image dimension"):
        load_benchmark("seedbench", "test", path=tmp_path / "seed", subjects=["Action Recognition"])
    with pytest.raises(MpsError, match="split 'validation' does not exist; valid: test"):
        load_benchmark("seedbench", "validation", path=tmp_path / "seed")


def test_seedbench_single_image_field_and_only_video(tmp_path):
    feats = Features({**{k: v for k, v in SEED_FEATURES.items() if k != "image"}, "image": Image()})
    rows = [dict(r, image=r["image"][0]) for r in seed_rows()]
    Dataset.from_list(rows, features=feats).save_to_disk(str(tmp_path / "single"))
    b = load_benchmark("seedbench", "test", path=tmp_path / "single")
    assert len(b) == 3 and isinstance(b[2]["image_1"], PILImage.Image)
    videos = [r for r in seed_rows() if r["data_type"] == "video"]
    DatasetDict({"test": Dataset.from_list(videos, features=SEED_FEATURES)}).save_to_disk(str(tmp_path / "v"))
    with pytest.raises(MpsError, match="0 questions"):
        load_benchmark("seedbench", "test", path=tmp_path / "v")


# --------------------------------------------------------------------------- synthetic
def test_synthetic():
    v1 = load_benchmark("synthetic-v1", "dev", limit=6)
    assert len(v1) == 6 and v1.has_answers and v1.name == "synthetic-v1"
    assert set(v1.subjects) <= {"Colour", "Shapes", "Charts", "Counting"}
    assert all(v1.question(i).skill == "perception" for i in range(len(v1)))
    from mpsearch.tasks.synthetic import SKILL_OF_SUBJECT, SUBJECTS
    b = load_benchmark("synthetic", "dev", limit=6)
    assert len(b) == 6 and b.has_answers and b.name == "synthetic"
    r = load_benchmark("synthetic", "validation", limit=18)
    assert r.name == "synthetic" and set(r.subjects) == set(SUBJECTS)
    assert {r.question(i).skill for i in range(len(r))} == {"perception", "reasoning"}
    assert all(r.question(i).skill == SKILL_OF_SUBJECT[r.question(i).subject] for i in range(len(r)))
    alias = load_benchmark("synthetic-reasoning", "validation", limit=18)
    assert alias.name == "synthetic" and [q.id for q in alias.questions] == [q.id for q in r.questions]
    with pytest.raises(MpsError, match="is not a synthetic subject"):
        load_benchmark("synthetic", "dev", subjects=["nope"])
    assert isinstance(b[0]["image_1"], PILImage.Image)
    assert b.question(0).answer in ("A", "B", "C", "D")
    b2 = load_benchmark("synthetic", "dev", subjects=["counting"], limit=3)
    assert b2.subjects == ["Counting"] and len(b2) == 3
    with pytest.raises(MpsError, match="generated, not read"):
        load_benchmark("synthetic", "dev", path="/tmp")
    with pytest.raises(MpsError, match="split 'test' does not exist"):
        load_benchmark("synthetic", "test")


def test_mmmu_prompt_unchanged_for_single_image_mc():
    # The demo model is trained on exactly this text: guard it.
    row = {"question": "<image 1> What colour is the circle?", "options": "['red', 'blue']",
           "question_type": "multiple-choice"}
    assert mmmu_prompt(row) == ("<image 1> What colour is the circle?\n(A) red\n(B) blue\n\n"
                                "Answer with the option's letter from the given choices directly.")
    assert mmmu_prompt({"question": "How many?", "options": "[]", "question_type": "open"}) == (
        "How many?\nAnswer the question using a single word or phrase.")
