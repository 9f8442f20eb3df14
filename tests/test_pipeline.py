"""`mpsearch run` end to end on a tiny model: artifacts, reuse on rerun, a kill mid-run, export."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mpsearch.pipeline import RunConfig, choose, run_pipeline

ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(model="tiny:llava", method="activation", calib_samples=8, batch_size=8, limit=24,
             search_trials=40, refine_trials=3, top_k=2,
             workload={"batch": 1, "phase": "prefill", "threads": 1, "repeats": 3, "warmup": 1})


def small_config(out: Path) -> RunConfig:
    return RunConfig(out=str(out), **SMALL)


def test_demo_example_config_is_the_default():
    assert RunConfig.from_yaml(ROOT / "examples" / "demo.yaml") == RunConfig()
    real = RunConfig.from_yaml(ROOT / "examples" / "qwen2vl-2b-mmmu-h100.yaml")
    assert set(real.to_dict()) == set(RunConfig().to_dict())


def test_run_writes_every_artifact_and_reuses_them(tmp_path):
    logs: list[str] = []
    summary = run_pipeline(small_config(tmp_path), log=logs.append)
    for name in ("sens.json", "latency.json", "front.json", "refined.json", "results.jsonl", "policy.yaml",
                 "stages.json", "summary.txt"):
        assert (tmp_path / name).is_file(), name
    assert {p.suffix for p in summary.plots} == {".png", ".svg"}
    assert (tmp_path / "plots" / "pareto.png").stat().st_size > 10_000
    # the exported map loads back, is fully expanded, and carries metrics and provenance
    doc = yaml.safe_load((tmp_path / "policy.yaml").read_text())
    from mpsearch.models import discover_layers, load_vlm

    model, _ = load_vlm("tiny:llava", load_processor=False)
    assert set(doc["layers"]) == {l.name for l in discover_layers(model)}
    assert doc["metrics"]["synthetic_accuracy"] == summary.chosen.accuracy
    assert doc["provenance"]["search_space"] == "cpu" and doc["provenance"]["seed"] == 0
    # the chosen policy meets both budgets (measured latency, or predicted when no measurement did)
    assert summary.budget_ms is None          # the demo's default: a memory budget at uniform 4-bit
    assert summary.chosen.memory_bytes <= summary.budget_mb * 2**20
    # never dominated: no evaluated result within the budget is as accurate, no bigger and faster
    c = summary.chosen
    assert not any(r.memory_bytes <= c.memory_bytes and r.latency_ms < c.latency_ms
                   and r.accuracy >= c.accuracy - 0.005 for r in summary.results
                   if r.memory_bytes <= summary.budget_mb * 2**20)
    for skill, acc in summary.chosen.per_skill.items():   # the synthetic set labels skills
        assert doc["metrics"][f"synthetic_accuracy_{skill}"] == acc
    assert set(summary.chosen.per_skill) == {"perception", "reasoning"}   # the demo set labels both skills
    # baselines, the ILP policy and searched policies were all evaluated, each once
    labels = [r.label for r in summary.results]
    assert labels[0] == "fp32" and "ilp" in labels and any(l.startswith("uniform") for l in labels)
    records = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
    keys = [r["result"]["policy_key"] for r in records]
    assert len(keys) == len(set(keys))
    # `mpsearch export` picks from the same results: the most accurate under a memory budget
    from mpsearch.cli import main
    from mpsearch.policy import Policy

    exported = tmp_path / "small.yaml"
    assert main(["export", str(tmp_path / "results.jsonl"), "--best-under-mb", str(summary.budget_mb),
                 "-o", str(exported)]) == 0
    pol = Policy.from_yaml(exported)
    expected = choose(summary.results, budget_mb=summary.budget_mb)   # the same rule, on the in-memory results
    assert pol.meta["provenance"]["label"] == expected.label
    assert pol.meta["metrics"]["synthetic_accuracy"] == expected.accuracy
    assert pol.meta["metrics"]["memory_bytes"] <= summary.budget_mb * 2**20
    assert pol.meta["model"] == "tiny:llava"
    # rerun: every stage reused, nothing appended
    logs.clear()
    run_pipeline(small_config(tmp_path), log=logs.append)
    for stage in ("profile", "latency", "search", "refine"):
        assert any(l.startswith(f"[{stage}] reusing") for l in logs), (stage, logs)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(records)
    # a changed input redoes that stage (and downstream), not the upstream ones
    logs.clear()
    cfg = small_config(tmp_path)
    cfg.search_trials = 45
    run_pipeline(cfg, log=logs.append)
    assert any(l.startswith("[profile] reusing") for l in logs)
    assert not any(l.startswith("[search] reusing") for l in logs)


def test_kill_during_run_then_rerun_loses_and_duplicates_nothing(tmp_path):
    cfg = tmp_path / "run.yaml"
    body = {"mpsearch_run": 1, **SMALL, "out": str(tmp_path / "out")}
    cfg.write_text(yaml.safe_dump(body))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mpsearch", "run", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    results = tmp_path / "out" / "results.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # kill once evaluation has written a record
        if results.exists() and results.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(l)["result"]["policy_key"] for l in results.read_text().splitlines() if l.strip()]
    out = subprocess.run([sys.executable, "-m", "mpsearch", "run", str(cfg)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    for stage in ("profile", "latency", "search", "refine"):
        assert f"[{stage}] reusing" in out.stdout
    after = [json.loads(l)["result"]["policy_key"] for l in results.read_text().splitlines() if l.strip()]
    assert after[: len(before)] == before          # nothing lost
    assert len(after) == len(set(after))           # nothing duplicated
    assert (tmp_path / "out" / "policy.yaml").exists()


class R:
    def __init__(self, label, acc, lat, mem, kl=0.0, pred=None):
        self.label, self.accuracy, self.latency_ms, self.memory_bytes, self.kl = label, acc, lat, mem, kl
        self.accuracy_ci = (acc - 0.05, acc + 0.05)
        self.predicted_latency_ms = pred if pred is not None else lat


def test_choose_against_brute_force():
    import random

    rng = random.Random(0)
    for _ in range(300):
        rs = [R(f"p{i}", rng.choice([0.5, 0.6, 0.62, 0.7]), rng.uniform(1, 10), rng.randint(1, 10) * 2**20,
                kl=rng.random()) for i in range(6)]
        b_ms, b_mb = rng.uniform(1, 10), rng.randint(1, 10)
        ok = [r for r in rs if r.latency_ms <= b_ms and r.memory_bytes <= b_mb * 2**20]
        if not ok:
            with pytest.raises(Exception, match="no evaluated policy meets"):
                choose(rs, budget_ms=b_ms, budget_mb=b_mb)
            continue
        best = choose(rs, budget_ms=b_ms, budget_mb=b_mb)
        assert best in ok
        # never dominated: nothing within the budgets is as accurate (0.5 points), no bigger and faster
        assert not any(r.accuracy >= best.accuracy - 0.005 and r.memory_bytes <= best.memory_bytes
                       and r.latency_ms < best.latency_ms for r in ok)
        # accuracy first: the choice cannot be told apart from the most accurate result in the budgets
        top = max(ok, key=lambda r: r.accuracy)
        assert best.accuracy_ci[1] >= top.accuracy or best.accuracy >= top.accuracy - 0.005
        # among the results that cannot be told apart from the most accurate, nothing is faster and no bigger
        close = [r for r in ok if r.accuracy_ci[1] >= top.accuracy and r.accuracy >= top.accuracy_ci[0]]
        assert not any(r.latency_ms < best.latency_ms and r.memory_bytes <= best.memory_bytes for r in close)
    rs = [R("fp", 0.9, 10, 4), R("a", 0.88, 5, 2), R("b", 0.80, 2, 1)]
    assert choose(rs, max_accuracy_drop=0.05).label == "a"
    # accuracy differences inside the interval do not buy a slower policy: the faster one is exported
    rs = [R("searched", 0.942, 6, 3, kl=1e-6), R("uniform", 0.940, 5, 3, kl=5e-4), R("far", 0.80, 1, 1, kl=0.0)]
    assert choose(rs, budget_ms=7).label == "uniform"
    # a clearly more accurate policy wins over a faster, less accurate one
    rs = [R("mixed", 0.95, 6, 3), R("uniform", 0.85, 5, 3)]
    assert choose(rs, budget_mb=4).label == "mixed"
