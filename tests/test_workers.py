"""Several `mpsearch search` workers on one study, and kill -9 mid-study then the same command again.

Real subprocesses against SQLite, a journal file and (when ``MPSEARCH_TEST_POSTGRES_URL`` is set,
as CI does) PostgreSQL: the study ends with the requested number of trials (exactly with one
worker, at most workers - 1 more with several), each evaluated once by one worker, no duplicate
trial numbers, nothing lost. A 100,000-trial study starts work at once (no row per requested
trial) and a kill during the study's creation resumes without enqueueing a seed twice.
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
    held = len(trials)
    # the documented bound: trials are created one at a time, so each other worker may add one
    # after the last check of the worker that filled the study
    assert n_trials <= held <= n_trials + n_workers - 1
    assert sorted(t.number for t in trials) == list(range(held))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    tickets = [t.system_attrs["mpsearch:ticket"] for t in trials]
    assert sorted(tickets) == list(range(held))  # every slot filled exactly once
    assert all(t.system_attrs.get(OWNER_KEY) for t in trials)  # each claimed by a worker (usually several share them)
    done_here = 0
    for i in range(n_workers):
        f = read_front(d / f"{name}-{i}.json")
        done_here += f.meta["trials"]["this_worker"]
        assert f and all(c.predicted_latency_ms <= budget for c in f)
    assert done_here == held  # each trial evaluated by one worker, none twice


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
    running = [t.number for t in before if t.state == optuna.trial.TrialState.RUNNING]
    waiting = [t for t in before if t.state == optuna.trial.TrialState.WAITING]
    # trials are created as they run: the study holds what ran, at most one running trial and
    # the seeds not reached yet (no row per requested trial)
    assert 15 <= len(complete) < n and len(before) == len(complete) + len(running) + len(waiting) < n
    assert all("fixed_params" in t.system_attrs and t.user_attrs.get("seed") for t in waiting)
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


def _load_trials(url: str, name: str) -> list:
    return optuna.load_study(study_name=name, storage=open_storage(url)).get_trials(deepcopy=False)


def _kill_once_complete(proc: subprocess.Popen, url: str, name: str, db: Path, k: int, limit_s: float = 120) -> None:
    """SIGKILL ``proc`` as soon as its study holds ``k`` complete trials."""
    storage = None
    deadline = time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            time.sleep(0.1)
            assert proc.poll() is None, f"search ended before it could be killed: {proc.stderr.read()}"
            if not db.exists():
                continue
            try:
                storage = storage or open_storage(url)
                done = optuna.load_study(study_name=name, storage=storage).get_trials(
                    deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            except (KeyError, optuna.exceptions.StorageInternalError):
                continue
            if len(done) >= k:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_100000_trial_study_killed_then_20_more(inputs, tmp_path):
    """The issue's scenario, small: a 100,000-trial SQLite study does work at once and writes a
    row per trial that ran (not per trial requested); killed, the same command asking for 20
    more trials than the study holds finishes promptly, evaluating each missing trial once."""
    import sqlite3

    d, budget = inputs
    db = tmp_path / "big.db"
    url, name = f"sqlite:///{db}", "big"
    proc = subprocess.Popen(_cmd(d, budget, url, name, 100_000, tmp_path / "front.json"), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_once_complete(proc, url, name, db, k=10)
    assert proc.returncode == -signal.SIGKILL
    before = _load_trials(url, name)
    complete = {t.number: (tuple(t.values), dict(t.params)) for t in before if t.state == optuna.trial.TrialState.COMPLETE}
    running = [t.number for t in before if t.state == optuna.trial.TrialState.RUNNING]
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
    assert len(complete) >= 10 and rows == len(before) < 100  # a few dozen rows, not 100,000
    assert len(running) <= 1

    held = len(before)
    t0 = time.monotonic()
    rerun = subprocess.run(_cmd(d, budget, url, name, held + 20, tmp_path / "front.json"), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    assert rerun.returncode == 0, rerun.stderr
    assert took < 120, f"the rerun took {took:.0f} s"
    after = _load_trials(url, name)
    numbers = [t.number for t in after]
    assert len(set(numbers)) == len(numbers) and sorted(numbers) == list(range(len(after)))
    retried = retried_numbers(after)
    assert retried == set(running) and len(after) - len(retried) == held + 20
    done = [t for t in after if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == held + 20 > len(complete)
    by_number = {t.number: t for t in after}
    for k, (values, params) in complete.items():  # finished trials are kept, never re-run
        assert tuple(by_number[k].values) == values and by_number[k].params == params
    front = read_front(tmp_path / "front.json")
    assert front.meta["trials"]["this_worker"] == held + 20 - len(complete)  # each missing trial run once


_DIE_AT = """
import os, signal, sys
import optuna
where, after = sys.argv[1], int(sys.argv[2])
real = getattr(optuna.Study, where)
calls = [0]
def dying(self, *a, **k):
    if calls[0] >= after:
        os.kill(os.getpid(), signal.SIGKILL)
    calls[0] += 1
    return real(self, *a, **k)
setattr(optuna.Study, where, dying)
from mpsearch.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where,after", [("set_metric_names", 0), ("enqueue_trial", 2)])
def test_kill_9_during_study_creation_resumes(inputs, tmp_path, where, after):
    """Killed right after the study row is written, or half-way through the seeds: the same
    command finishes the creation (each seed enqueued once) and runs the study."""
    d, budget = inputs
    url, name, n = f"sqlite:///{tmp_path}/c.db", "created", 12
    cmd = _cmd(d, budget, url, name, n, tmp_path / "front.json")
    dead = subprocess.run([sys.executable, "-c", _DIE_AT, where, str(after)] + cmd[3:], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert dead.returncode == -signal.SIGKILL, dead.stderr
    half = _load_trials(url, name)
    assert len(half) == (0 if where == "set_metric_names" else after)
    rerun = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    trials = _load_trials(url, name)
    assert sorted(t.number for t in trials) == list(range(n))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    seeded = [t for t in trials if "fixed_params" in t.system_attrs]
    keys = [json.dumps(t.system_attrs["fixed_params"], sort_keys=True) for t in seeded]
    assert len(set(keys)) == len(keys)  # no seed enqueued twice
    # the same seeds as a study created in one go
    from mpsearch.latency import LatencyTable
    from mpsearch.searching import search
    from mpsearch.sensitivity.report import SensitivityReport
    from mpsearch.space import SearchSpace

    ref_url = f"sqlite:///{tmp_path}/ref.db"
    search(SensitivityReport.from_json(d / "sens.json"), LatencyTable.from_json(d / "lat.json"),
           SearchSpace.from_yaml(d / "space.yaml"), budget_ms=budget, n_trials=n, sampler="evo", front_points=2,
           storage=ref_url, study_name="ref", progress=False)
    ref = [t for t in _load_trials(ref_url, "ref") if "fixed_params" in t.system_attrs]
    assert sorted(keys) == sorted(json.dumps(t.system_attrs["fixed_params"], sort_keys=True) for t in ref)
    assert sorted(t.user_attrs["seed"] for t in seeded) == sorted(t.user_attrs["seed"] for t in ref)
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    assert study.user_attrs["mpsearch"]["stage"] == "search" and study.metric_names


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_an_objective_that_raises_puts_its_trial_back(tmp_path, exc):
    """A bug or Ctrl-C in the objective fails the trial, enqueues its retry and propagates; the
    next run evaluates the retry (same parameters) and the study reaches its size."""
    from mpsearch.searching._study import TrialOutcome, count_trials, open_study, run_worker

    st = open_storage(f"sqlite:///{tmp_path}/x.db")
    study, created = open_study(st, "x", ["minimize"], optuna.samplers.RandomSampler(seed=0), 5)
    assert created and study.get_trials() == []
    seen: list[float] = []

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        seen.append(x)
        if len(seen) == 3:
            raise exc("boom")
        return TrialOutcome([x], {}, {})

    with pytest.raises(exc, match="boom"):
        run_worker(study, objective, storage=st, n_trials=5, progress=False)
    trials = study.get_trials()
    assert [t.state for t in trials[:3]] == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.FAIL]
    assert f"{exc.__name__}: boom" in trials[2].user_attrs["fail_reason"]
    retry = trials[3]
    assert retry.state == optuna.trial.TrialState.WAITING and retry.params == {"x": seen[2]}
    assert retry.system_attrs["retry_history"] == [2] and "fail_reason" not in retry.user_attrs
    counts = run_worker(study, objective, storage=st, n_trials=5, progress=False)
    trials = study.get_trials()
    assert counts == {"complete": 3, "failed": 0} and count_trials(trials) == 5 and len(trials) == 6
    assert trials[3].state == optuna.trial.TrialState.COMPLETE and trials[3].params == {"x": seen[2]}


def test_a_failed_heartbeat_is_a_logged_warning(tmp_path, caplog, monkeypatch):
    import logging
    import warnings

    st = open_storage(f"sqlite:///{tmp_path}/h.db")
    study = optuna.create_study(storage=st, study_name="h")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats outside Study.optimize
        study.ask()
    tid = st.get_trial_id_from_study_id_trial_number(st.get_study_id_from_name("h"), 0)

    def busy(self, trial_id):
        raise optuna.exceptions.StorageInternalError("database is locked")

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", busy)
    with caplog.at_level(logging.WARNING, logger="mpsearch.searching._study"):
        st.record_heartbeat(tid)  # the heartbeat thread goes on
    assert f"heartbeat of trial id {tid} not recorded (StorageInternalError: database is locked)" in caplog.text
