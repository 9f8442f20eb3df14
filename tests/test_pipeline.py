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
    assert summary.budget_ms is None          # the demo's default: a memory budget at 2.5 bits per weight
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


def test_relevant_uniform_leaves_out_only_over_budget_and_not_faster():
    """A uniform baseline is left out exactly when it is over a budget and predicted no faster
    than full precision (checked on every format of a hand-made table)."""
    from mpsearch.latency import LatencyTable
    from mpsearch.models import Layer
    from mpsearch.pipeline import relevant_uniform
    from mpsearch.space import SearchSpace

    torch = pytest.importorskip("torch")
    layers = [Layer("fc1", "language", 64, 64, False), Layer("fc2", "language", 64, 64, False)]
    model = torch.nn.Module()
    model.fc1, model.fc2 = torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False)
    space = SearchSpace("t", {"language": ["fp32", "bf16", "torch.int8dyn", "rtn.int4", "rtn.int2"]})
    per = {"fp32": 1.0, "bf16": 4.0, "torch.int8dyn": 0.5, "rtn.int4": 1.5, "rtn.int2": 0.9}
    lat = LatencyTable(0.0, {n: dict(per) for n in ("fc1", "fc2")})
    mib = {f: 2 * 64 * 64 * b / 8 / 2**20 for f, b in {"fp32": 32, "bf16": 16}.items()}
    budget = mib["bf16"] - 1e-6  # bf16 and fp32 over it; int8 and below within
    keep, notes = relevant_uniform(space, layers, lat, model, None, budget)
    # bf16: over the memory budget and slower than fp32 -> out; int8dyn: within; rtn.int4: within
    # the budget though slower; fp32 is the reference
    assert keep == ["fp32", "torch.int8dyn", "rtn.int4", "rtn.int2"]
    assert len(notes) == 1 and notes[0].startswith("not evaluated: uniform bf16 (predicted 8.0 ms")
    assert "over the memory budget and no faster than fp32 (2.0 ms predicted)" in notes[0]
    # a latency budget: rtn.int4 (3.0 ms) is over it and slower than fp32 -> out too
    keep, notes = relevant_uniform(space, layers, lat, model, 2.5, None)
    assert keep == ["fp32", "torch.int8dyn", "rtn.int2"] and len(notes) == 2
    # bf16 under budget would be kept: nothing is left out without a budget it breaks
    keep, _ = relevant_uniform(space, layers, lat, model, None, 1.0)
    assert keep == ["fp32", "bf16", "torch.int8dyn", "rtn.int4", "rtn.int2"]


def test_auto_bits_budget_interpolates_between_uniform_policies():
    """budget_mb auto:<bits>: a format's own uniform memory at its bits, linear in between, and
    an error naming the space's widths outside them; plain auto stays uniform 4-bit."""
    from mpsearch.formats import policy_memory_bytes
    from mpsearch.models import discover_layers, load_vlm
    from mpsearch.pipeline import resolve_budgets
    from mpsearch.space import SearchSpace
    from mpsearch.errors import MpsError

    model, _ = load_vlm("tiny:llava", load_processor=False)
    layers = discover_layers(model)
    space = SearchSpace.from_yaml("cpu")
    mib = {p.meta["format"]: policy_memory_bytes(model, p) / 2**20 for p in space.uniform_policies(layers)}
    assert resolve_budgets(None, "auto:3", None, space, layers, model)[1] == mib["rtn.int3"]
    _, half = resolve_budgets(None, "auto:2.5", None, space, layers, model)
    assert half == pytest.approx((mib["rtn.int2"] + mib["rtn.int3"]) / 2, rel=1e-12)
    assert mib["rtn.int2"] < half < mib["rtn.int3"]
    assert resolve_budgets(None, "auto", None, space, layers, model)[1] == min(mib["rtn.int4"], mib["torch.int4wo"])
    with pytest.raises(MpsError, match=r"auto:1 is outside the bit widths of search space 'cpu' \(2, 3, 4"):
        resolve_budgets(None, "auto:1", None, space, layers, model)
