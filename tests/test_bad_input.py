"""Bad input through the CLI: one line naming the problem and what is valid, exit code 2,
nothing half-written. One test per case of the reliability issue."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpsearch.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The single ``error:`` line (third-party warnings on stderr are not ours to judge)."""
    lines = [l for l in err.strip().splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, f"expected one error line on stderr, got:\n{err}"
    return lines[0]


def test_missing_model_real_subprocess(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mpsearch", "layers", "no-such-org/no-such-vlm"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "no-such-org/no-such-vlm" in line and "local" in line  # says where it looked and how to point at a copy
    assert "Traceback" not in proc.stderr


def test_misspelled_local_model_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "layers", tmp_path / "InternVL2-2b-typo")
    assert code == 2
    line = one_error_line(err)
    assert "InternVL2-2b-typo" in line


def test_model_without_vision_tower(capsys, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "text-only")
    code, _, err = run_cli(capsys, "layers", tmp_path / "text-only")
    assert code == 2
    line = one_error_line(err)
    assert "vision" in line.lower()


@pytest.mark.parametrize(
    "content, needle",
    [
        ("mpsearch: 1\ndefault: fp32\nlayers: {a: bf16\n", "not valid YAML"),                     # corrupt
        ("mpsearch: 7\ndefault: fp32\n", "schema version) is 7"),                                # foreign schema
        ("mpsearch: 1\ndefault: fp32\nlayers:\n  lm_head: int5\n", "unknown format 'int5'"),      # unknown format
        ("mpsearch: 1\ndefault: fp32\nlayers:\n  model.language_model.layers.0.mlp.up_prj: bnb.int8\n",
         "unknown layer 'model.language_model.layers.0.mlp.up_prj'"),                            # other model / typo
    ],
)
def test_bad_precision_map(capsys, tmp_path, content, needle):
    path = tmp_path / "policy.yaml"
    path.write_text(content)
    code, out, err = run_cli(capsys, "apply", "tiny:llava", path)
    assert code == 2
    assert needle in one_error_line(err)
    assert out == ""


def test_precision_map_layer_error_suggests_the_real_name(capsys, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("mpsearch: 1\ndefault: fp32\nlayers:\n  model.language_model.layers.0.mlp.up_prj: bnb.int8\n")
    _, _, err = run_cli(capsys, "apply", "tiny:llava", path)
    assert "model.language_model.layers.0.mlp.up_proj" in err


def test_corrupt_and_foreign_sensitivity_report(capsys, tmp_path):
    bad = tmp_path / "sens.json"
    bad.write_text('{"schema": 1, "kind": "sensitivity", "scores": {')
    code, _, err = run_cli(capsys, "profile", "--compare", bad, bad)
    assert code == 2 and "not valid JSON" in one_error_line(err)
    foreign = tmp_path / "lat.json"
    foreign.write_text(json.dumps({"schema": 1, "kind": "latency", "base_ms": 1.0, "ms": {}}))
    code, _, err = run_cli(capsys, "profile", "--compare", foreign, foreign)
    assert code == 2 and "'kind' is 'latency', expected 'sensitivity'" in one_error_line(err)
    newer = tmp_path / "sens2.json"
    newer.write_text(json.dumps({"schema": 99, "kind": "sensitivity", "scores": {}}))
    code, _, err = run_cli(capsys, "profile", "--compare", newer, newer)
    assert code == 2 and "schema" in one_error_line(err)


def test_unknown_format_in_search_space(capsys, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("name: s\ngroups:\n  vision: [fp32]\n  projector: [fp32]\n  language: [fp32, int5]\n  head: [fp32]\n")
    out = tmp_path / "lat.json"
    code, _, err = run_cli(capsys, "latency", "tiny:llava", "--space", space, "-o", out)
    assert code == 2
    assert "unknown format 'int5'" in one_error_line(err)
    assert not out.exists()


def test_space_with_format_unusable_on_device(capsys, tmp_path):
    out = tmp_path / "lat.json"
    code, _, err = run_cli(capsys, "latency", "tiny:llava", "--space", "gpu-ao", "-o", out)
    assert code == 2
    assert "cannot run on cpu" in one_error_line(err)
    assert not out.exists()


def _mmmu_dir(tmp_path, split: str, answer: str) -> Path:
    import datasets
    from PIL import Image

    img = Image.new("RGB", (28, 28), (200, 10, 10))
    ds = datasets.Dataset.from_dict({
        "id": [f"{split}_Art_1"], "question": ["<image 1> What colour?"], "options": ["['red', 'blue']"],
        "answer": [answer], "subject": ["Art"], "question_type": ["multiple-choice"], "image_1": [img],
    })
    datasets.DatasetDict({split: ds}).save_to_disk(str(tmp_path / "mmmu"))
    return tmp_path / "mmmu"


def test_empty_split(capsys, tmp_path):
    data = _mmmu_dir(tmp_path, "validation", "A")
    out = tmp_path / "results.jsonl"
    code, _, err = run_cli(capsys, "evaluate", "tiny:llava", "--benchmark", "mmmu", "--split", "validation",
                           "--subjects", "Physics", "--data", data, "--no-latency", "-o", out)
    assert code == 2
    line = one_error_line(err)
    assert "validation" in line and ("no rows" in line or "empty" in line or "0 " in line)
    assert not out.exists() or out.read_text() == ""


def test_answerless_split_refused_for_scoring(capsys, tmp_path):
    data = _mmmu_dir(tmp_path, "test", "?")
    out = tmp_path / "results.jsonl"
    code, _, err = run_cli(capsys, "evaluate", "tiny:llava", "--benchmark", "mmmu", "--split", "test",
                           "--data", data, "--no-latency", "-o", out)
    assert code == 2
    line = one_error_line(err)
    assert "answer" in line and "test" in line
    assert not out.exists() or out.read_text() == ""


def test_bad_run_config(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("mpsearch_run: 1\nmodel: demo\nbudget_msec: 3\n")
    code, _, err = run_cli(capsys, "run", cfg, "-o", tmp_path / "out")
    assert code == 2
    assert "run.yaml:3: unknown field 'budget_msec'" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def _tiny_reports(tmp_path):
    """A sensitivity report and a latency table for tiny:llava, written as the CLI writes them."""
    import mpsearch as mps
    from mpsearch.latency import LatencyTable

    model, processor = mps.load_vlm("tiny:llava")
    layers = mps.discover_layers(model)
    space = mps.SearchSpace.from_yaml("cpu")
    sens = mps.profile(model, processor, list(mps.load_benchmark("synthetic", "dev", limit=4)), layers, space,
                       method="activation", n_samples=4, batch_size=2, progress=False, model_name="tiny:llava")
    lat = LatencyTable(base_ms=1.0, ms={l.name: {f: 0.1 for f in space.candidates(l)} for l in layers},
                       meta={"model": "tiny:llava"})
    sens.to_json(tmp_path / "sens.json")
    lat.to_json(tmp_path / "lat.json")
    return tmp_path / "sens.json", tmp_path / "lat.json"


def test_budget_below_the_fastest_policy(capsys, tmp_path):
    sens, lat = _tiny_reports(tmp_path)
    out = tmp_path / "front.json"
    code, _, err = run_cli(capsys, "search", "--sens", sens, "--latency", lat, "--space", "cpu",
                           "--budget-ms", "0.5", "--n-trials", "5", "-o", out)
    assert code == 2
    line = one_error_line(err)
    assert "budget_ms=0.5" in line and "fastest" in line
    assert not out.exists()


def test_budget_above_the_slowest_policy_warns(capsys, tmp_path):
    sens, lat = _tiny_reports(tmp_path)
    out = tmp_path / "front.json"
    with pytest.warns(UserWarning, match="budget_ms=1000 is at or above the slowest policy.*constrains nothing"):
        code, _, _ = run_cli(capsys, "search", "--sens", sens, "--latency", lat, "--space", "cpu",
                             "--budget-ms", "1000", "--n-trials", "5", "--no-progress", "-o", out)
    assert code == 0 and out.exists()


def test_pins_leave_nothing_to_search(capsys, tmp_path):
    sens, lat = _tiny_reports(tmp_path)
    space = tmp_path / "pinned.yaml"
    space.write_text("name: pinned\ngroups: {vision: [fp32], projector: [fp32], language: [fp32], head: [fp32]}\n"
                     "pin: {'*': fp32}\n")
    out = tmp_path / "front.json"
    code, _, err = run_cli(capsys, "search", "--sens", sens, "--latency", lat, "--space", space,
                           "--budget-ms", "10", "--n-trials", "5", "-o", out)
    assert code == 2
    assert "nothing to search" in one_error_line(err)
    assert not out.exists()


def test_latency_table_of_another_model(capsys, tmp_path):
    from mpsearch.latency import LatencyTable

    sens, _ = _tiny_reports(tmp_path)
    other = LatencyTable(base_ms=1.0, ms={"encoder.layers.0.fc1": {"fp32": 0.1}}, meta={"model": "other"})
    other.to_json(tmp_path / "other.json")
    out = tmp_path / "front.json"
    code, _, err = run_cli(capsys, "search", "--sens", sens, "--latency", tmp_path / "other.json", "--space", "cpu",
                           "--budget-ms", "10", "--n-trials", "5", "-o", out)
    assert code == 2
    assert "latency" in one_error_line(err).lower()
    assert not out.exists()
