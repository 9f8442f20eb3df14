"""Several `mpsearch search` workers on one study, and kill -9 mid-study then the same command again.

Real subprocesses against SQLite, a journal file and (when ``MPSEARCH_TEST_POSTGRES_URL`` is set,
as CI does) PostgreSQL: the study ends with exactly the requested number of trials, each
evaluated once by one worker, no duplicate trial numbers, nothing lost.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from mpsearch.searching import open_storage, read_front
from mpsearch.searching._proxy import ProxyProblem
from mpsearch.searching._study import OWNER_KEY, retried_numbers
from mpsearch.searching.synthetic import synthetic_instance

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("workers")
    inst = synthetic_instance(n_blocks=3, vision_blocks=2, hidden=256, vision_hidden=128, seed=7)
    inst.sens.to_json(d / "sens.json")
    inst.lat.to_json(d / "lat.json")
    (d / "space.yaml").write_text(json.dumps({"name": "synthetic", "groups": inst.space.groups, "pin": inst.space.pin,
                                              "tie": inst.space.tie}))
    prob = ProxyProblem.build(inst.sens, inst.lat, inst.space, inst.layers)
    lo, hi = prob.latency_ms(prob.fastest()), prob.latency_ms(prob.slowest())
    return d, lo + 0.4 * (hi - lo)


def _cmd(d: Path, budget: float, url: str, name: str, n: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "mpsearch.cli", "search", "--sens", str(d / "sens.json"), "--latency", str(d / "lat.json"),
            "--space", str(d / "space.yaml"), "--budget-ms", repr(budget), "--n-trials", str(n), "--sampler", "evo",
            "--front-points", "2", "--storage", url, "--study-name", name, "--no-progress", "-o", str(out)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_workers(inputs, url: str, name: str, n_trials: int, n_workers: int = 4) -> None:
    d, budget = inputs
    procs = [subprocess.Popen(_cmd(d, budget, url, name, n_trials, d / f"{name}-{i}.json"), cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n_workers)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, f"worker failed ({p.returncode}):\n{o}\n{e}"
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == n_trials
    assert sorted(t.number for t in trials) == list(range(n_trials))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    tickets = [t.system_attrs["mpsearch:ticket"] for t in trials]
    assert sorted(tickets) == list(range(n_trials))  # every ticket claimed exactly once
    assert all(t.system_attrs.get(OWNER_KEY) for t in trials)  # each claimed by a worker (usually several share them)
    done_here = 0
    for i in range(n_workers):
        f = read_front(d / f"{name}-{i}.json")
        done_here += f.meta["trials"]["this_worker"]
        assert f and all(c.predicted_latency_ms <= budget for c in f)
    assert done_here == n_trials  # each trial evaluated by one worker, none twice


def test_four_workers_sqlite(inputs, tmp_path):
    _run_workers(inputs, f"sqlite:///{tmp_path}/w.db", "sqlite-workers", 40)


def test_four_workers_journal(inputs, tmp_path):
    _run_workers(inputs, f"journal:///{tmp_path}/w.log", "journal-workers", 40)


@pytest.mark.postgres
def test_four_workers_postgres(inputs):
    url = os.environ.get("MPSEARCH_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must start PostgreSQL and set MPSEARCH_TEST_POSTGRES_URL (see .ci/run)")
        pytest.skip("MPSEARCH_TEST_POSTGRES_URL is not set (CI sets it after starting PostgreSQL)")
    _run_workers(inputs, url, f"pg-workers-{uuid.uuid4().hex[:8]}", 40)


def test_kill_9_then_rerun_resumes(inputs, tmp_path):
    d, budget = inputs
    url, name, n = f"sqlite:///{tmp_path}/k.db", "killed", 300
    cmd = _cmd(d, budget, url, name, n, tmp_path / "front.json")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    storage = None
    deadline = time.monotonic() + 300
    complete: dict[int, tuple] = {}
    try:
        while time.monotonic() < deadline:
            time.sleep(0.1)
            assert proc.poll() is None, f"search ended before it could be killed: {proc.stderr.read()}"
            if not (tmp_path / "k.db").exists():
                continue
            try:
                storage = storage or open_storage(url)
                study = optuna.load_study(study_name=name, storage=storage)
                done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            except (KeyError, optuna.exceptions.StorageInternalError):
                continue
            if len(done) >= 15:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    before = study.get_trials(deepcopy=False)
    complete = {t.number: (tuple(t.values), dict(t.params)) for t in before if t.state == optuna.trial.TrialState.COMPLETE}
    assert 15 <= len(complete) < n and len(before) == n
    running = [t.number for t in before if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) <= 1

    rerun = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    front = read_front(tmp_path / "front.json")
    after = optuna.load_study(study_name=name, storage=open_storage(url)).get_trials(deepcopy=False)
    retried = retried_numbers(after)
    assert retried == set(running)  # the trial the dead worker held was failed and retried once
    assert len(after) - len(retried) == n and len(after) == n + len(running)
    assert sorted(t.number for t in after) == list(range(len(after)))
    by_number = {t.number: t for t in after}
    for k, (values, params) in complete.items():  # finished trials are reused, untouched
        assert tuple(by_number[k].values) == values and by_number[k].params == params
    for k in running:
        t = by_number[k]
        assert t.state == optuna.trial.TrialState.FAIL and "worker died" in t.user_attrs["fail_reason"]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in after if t.number not in retried)
    assert front.meta["trials"]["this_worker"] == n - len(complete)  # nothing evaluated twice
    assert not front.failures  # the dead worker's trial is not a failure of the study
