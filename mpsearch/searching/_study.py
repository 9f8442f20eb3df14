"""Optuna studies that survive restarts and share work between processes, exactly.

Storage URLs (``storage=`` / ``--storage``):

* ``None`` or ``"memory"``: in-process (``optuna.storages.InMemoryStorage``), nothing kept.
* ``sqlite:///path/study.db``: one file; several processes on one machine. Opened in WAL mode
  with ``BEGIN IMMEDIATE`` transactions (pysqlite otherwise reads outside the transaction and
  two workers can claim the same trial) and a 60 s busy timeout.
* ``journal:///path/study.log`` (or ``journal:relative/path.log``): Optuna's
  ``JournalStorage`` on a ``JournalFileBackend`` (append-only log, file lock); one machine or a
  shared file system.
* ``postgresql://user:password@host:5432/db`` (needs ``pip install psycopg2-binary``),
  ``mysql+pymysql://...``: any SQLAlchemy URL, ``optuna.storages.RDBStorage``; workers on many
  machines point at one database.

How the trial count stays exact with several workers: the process that creates a study
enqueues one WAITING trial per requested trial (a *ticket*: the seeds first, then empty ones the
sampler fills in) and marks the study ready; every worker only ever claims WAITING trials
(Optuna's atomic WAITING -> RUNNING transition), never creates trials, and stops when none
are left. So a study holds exactly ``n_trials`` trials however many workers run, each one is
evaluated by exactly one worker, and a rerun with the same study name continues where the
study stopped (finished trials are reused, never re-run).

A worker killed with ``kill -9`` leaves its trial RUNNING. The next worker to start fails it
(``fail_reason``: worker died) and enqueues one retry with the same parameters, as
``optuna.storages.RetryFailedTrialCallback`` does: a trial whose owner process is gone is
detected on the same host by its pid; on RDB storages the heartbeat (every 30 s, stale after
120 s) also catches workers that died on other machines. Retried trials are not counted
against ``n_trials``.

Example:
    >>> st = open_storage("sqlite:////tmp/s.db")                   # doctest: +SKIP
    >>> study, created = open_study(st, "demo", ["minimize"], sampler, n_trials=100)  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import optuna
from optuna.trial import TrialState

from mpsearch.errors import MpsError

#: Study system attribute: number of tickets the creator enqueued (set when all are in).
TICKETS_KEY = "mpsearch:tickets"
#: Trial system attribute: ``host:pid:start`` of the worker evaluating it.
OWNER_KEY = "mpsearch:owner"
#: Trial system attribute on a trial failed because its worker died.
STALE_KEY = "mpsearch:stale"
HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 120
READY_WAIT_S = 60.0


class TrialFailed(Exception):
    """Raised by an objective to record the trial as FAILED with a reason (the study goes on)."""


# -- storages ---------------------------------------------------------------------------------
def open_storage(url: Any = None, heartbeat: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url`` (see the module doc for the URLs understood).

    Example:
        >>> type(open_storage(None)).__name__
        'InMemoryStorage'
    """
    if isinstance(url, optuna.storages.BaseStorage):
        return url
    if url is None or str(url) in ("", "memory", ":memory:"):
        return optuna.storages.InMemoryStorage()
    url = str(url)
    if url.startswith("journal:"):
        path = url[len("journal:"):]
        if path.startswith("///"):
            path = path[2:]
        elif path.startswith("//"):
            raise MpsError(f"storage {url!r}: write journal:///absolute/path.log or journal:relative/path.log")
        if not path:
            raise MpsError(f"storage {url!r}: no journal file named")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise MpsError(
            f"storage {url!r}: not a storage URL; valid: memory, sqlite:///file.db, journal:///file.log, "
            "postgresql://user:pass@host/db (any SQLAlchemy URL)"
        )
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {
            "heartbeat_interval": HEARTBEAT_INTERVAL_S,
            "grace_period": HEARTBEAT_GRACE_S,
            "heartbeat_stale_trial_callback": _retry_stale_trial,
        }
    if url.startswith("sqlite:"):
        return _sqlite_storage(url, kwargs)
    url = _postgres_driver(url)
    engine_kwargs = {"pool_pre_ping": True}
    last: Exception | None = None
    for attempt in range(5):  # concurrent first-time table creation can collide: retry
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except ImportError as exc:
            raise MpsError(f"storage {redact(url)}: the database driver is missing ({exc}); for PostgreSQL: pip install psycopg2-binary") from None
        except Exception as exc:  # noqa: BLE001 - sqlalchemy errors of many kinds
            last = exc
            time.sleep(0.5 * (attempt + 1))
    raise MpsError(f"storage {redact(url)}: cannot open ({type(last).__name__}: {str(last).splitlines()[0] if last else ''})")


def _postgres_driver(url: str) -> str:
    """``postgresql://`` without a driver: SQLAlchemy 2.1 picks psycopg (v3); use psycopg2 when
    only it is installed (``pip install psycopg2-binary``, mpsearch's ``postgres`` extra)."""
    if not (url.startswith("postgresql://") or url.startswith("postgres://")):
        return url
    import importlib.util

    rest = url.split("://", 1)[1]
    if importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg://" + rest
    if importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + rest
    raise MpsError(f"storage {redact(url)}: no PostgreSQL driver installed; pip install psycopg2-binary (or psycopg)")


def _sqlite_storage(url: str, kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    from sqlalchemy import event

    path = url.split(":///", 1)[1] if ":///" in url else ""
    if not path or path == ":memory:":
        raise MpsError(f"storage {url!r}: give a file, e.g. sqlite:///study.db (for in-memory use 'memory')")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path + ".lock"):  # table creation by several processes at once would race
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}, **kwargs)

    @event.listens_for(storage.engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:  # pragma: no cover - exercised via sqlite
        dbapi_conn.isolation_level = None  # let the "begin" hook issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(storage.engine, "begin")
    def _on_begin(conn: Any) -> None:  # pragma: no cover
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    storage.engine.dispose()  # drop connections opened before the hooks
    return storage


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def redact(url: Any) -> str:
    """A storage URL with its password hidden (for logs and artifacts)."""
    s = str(url) if url is not None else "memory"
    if "://" in s and "@" in s.split("://", 1)[1]:
        scheme, rest = s.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        user = cred.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return s


def storage_label(storage: Any, url: Any) -> str:
    """What a front file records about the storage."""
    if isinstance(url, str) and url:
        return redact(url)
    return type(storage).__name__


# -- studies ------------------------------------------------------------------------------------
def fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-able inputs (what a study was made for)."""
    blob = json.dumps(parts, sort_keys=True, default=_json_default)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def open_study(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    directions: Sequence[str],
    sampler: optuna.samplers.BaseSampler,
    n_trials: int,
    seeds: Sequence[Mapping[str, Any]] = (),
    seed_attrs: Sequence[Mapping[str, Any]] = (),
    user_attrs: Mapping[str, Any] | None = None,
    metric_names: Sequence[str] | None = None,
    fingerprint_value: str | None = None,
    wait_s: float = READY_WAIT_S,
) -> tuple[optuna.Study, bool]:
    """Create or load ``study_name`` and make sure it holds ``n_trials`` tickets.

    Returns ``(study, created)``. A loaded study made for other inputs (another fingerprint)
    or with other objectives raises :class:`MpsError`. ``seeds`` (parameter dicts, with
    ``seed_attrs`` user attributes) are enqueued first when the study is created.
    """
    if n_trials < 1:
        raise MpsError(f"n_trials must be at least 1, got {n_trials}")
    dirs = [optuna.study.StudyDirection.MINIMIZE if d == "minimize" else optuna.study.StudyDirection.MAXIMIZE for d in directions]
    created = False
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=list(directions), sampler=sampler)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    if list(study.directions) != dirs:
        raise MpsError(
            f"study {study_name!r} exists with {len(study.directions)} objective(s) "
            f"{[d.name.lower() for d in study.directions]}, not {list(directions)}: use another --study-name"
        )
    if created:
        if metric_names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(metric_names))
        for k, v in (user_attrs or {}).items():
            study.set_user_attr(k, v)
        if fingerprint_value:
            _set_study_sys(study, "mpsearch:fingerprint", fingerprint_value)
        _enqueue_tickets(study, n_trials, list(seeds)[:n_trials], list(seed_attrs)[:n_trials], start=0)
        _set_study_sys(study, TICKETS_KEY, int(n_trials))
        return study, True
    if fingerprint_value:
        theirs = study_sys_attrs(study).get("mpsearch:fingerprint")
        if theirs is not None and theirs != fingerprint_value:
            raise MpsError(
                f"study {study_name!r} in this storage was made for other inputs (sensitivity, latency, "
                "space, budget or objectives differ): use another --study-name, or the same inputs to resume"
            )
    have = _wait_ready(study, wait_s)
    if have is None:  # the creator died while enqueuing: finish its work
        have = count_tickets(study)
        _enqueue_tickets(study, max(0, n_trials - have), [], [], start=have)
        _set_study_sys(study, TICKETS_KEY, max(int(n_trials), have))
    elif n_trials > have:
        _enqueue_tickets(study, n_trials - have, [], [], start=have)
        _set_study_sys(study, TICKETS_KEY, int(n_trials))
    return study, False


def _enqueue_tickets(study: optuna.Study, n: int, seeds: list[Mapping[str, Any]], attrs: list[Mapping[str, Any]], start: int) -> None:
    for i in range(n):
        params = dict(seeds[i]) if i < len(seeds) else {}
        ua = dict(attrs[i]) if i < len(attrs) else {}
        sys_attrs: dict[str, Any] = {"mpsearch:ticket": start + i}
        if params:
            sys_attrs["fixed_params"] = params
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, user_attrs=ua, system_attrs=sys_attrs))


def _wait_ready(study: optuna.Study, wait_s: float) -> int | None:
    deadline = time.monotonic() + wait_s
    last = -1
    while True:
        have = study_sys_attrs(study).get(TICKETS_KEY)
        if have is not None:
            return int(have)
        n = len(study.get_trials(deepcopy=False))
        if n != last:  # the creator is still enqueuing: keep waiting
            last = n
            deadline = time.monotonic() + wait_s
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def study_sys_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's system attributes (read from its storage)."""
    return dict(study._storage.get_study_system_attrs(study._study_id))


def _set_study_sys(study: optuna.Study, key: str, value: Any) -> None:
    study._storage.set_study_system_attr(study._study_id, key, value)


def retried_numbers(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of trials whose worker died and that were retried (they do not count)."""
    return {int(t.system_attrs["failed_trial"]) for t in trials if "failed_trial" in t.system_attrs}


def count_tickets(study: optuna.Study) -> int:
    """Trials of the study that count against ``n_trials``: all but those retried after a worker died."""
    trials = study.get_trials(deepcopy=False)
    return len(trials) - len(retried_numbers(trials))


# -- liveness of workers -------------------------------------------------------------------------
def _proc_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def worker_id() -> str:
    """``host:pid:start`` of this process (start = kernel start time, guards against pid reuse)."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_proc_start(pid)}"


def _owner_dead(owner: str) -> bool:
    try:
        host, pid_s, start = owner.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False  # cannot tell from here; the RDB heartbeat covers other machines
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return start != "?" and _proc_start(pid) not in (start, "?")


def reclaim_dead(study: optuna.Study) -> int:
    """Fail the RUNNING trials of dead workers and enqueue one retry each; returns how many."""
    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            optuna.storages.fail_stale_trials(study)  # RDB heartbeat (no-op elsewhere)
        except Exception:  # noqa: BLE001 - best effort; the pid check below still runs
            pass
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(OWNER_KEY)
        if not owner or not _owner_dead(str(owner)):
            continue
        reason = f"worker died while evaluating it ({owner})"
        try:
            study._storage.set_trial_system_attr(t._trial_id, STALE_KEY, True)
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            ok = study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        if ok:
            _enqueue_retry(study, study._storage.get_trial(t._trial_id), reason)
            n += 1
    return n


def _retry_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Heartbeat-stale callback of RDB storages: mark and retry."""
    with contextlib.suppress(Exception):
        study._storage.set_trial_system_attr(trial._trial_id, STALE_KEY, True)
    _enqueue_retry(study, trial, "worker stopped sending heartbeats")


def _enqueue_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> None:
    params = dict(trial.system_attrs.get("fixed_params") or trial.params)
    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    sys_attrs: dict[str, Any] = {"failed_trial": trial.number, "retry_history": history, "retry_reason": reason}
    if params:
        sys_attrs["fixed_params"] = params
    ua = {k: v for k, v in trial.user_attrs.items() if k in ("seed", "label")}
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, user_attrs=ua, system_attrs=sys_attrs))


# -- the worker loop -----------------------------------------------------------------------------
@dataclass
class TrialOutcome:
    """What an objective returns: objective values, constraints (<= 0 is feasible), user attrs."""

    values: list[float]
    constraints: dict[str, float]
    user_attrs: dict[str, Any]


def _pop_waiting(study: optuna.Study) -> int | None:
    storage = study._storage
    for _attempt in range(50):
        try:
            waiting = storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
            for t in waiting:
                try:
                    if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                        return t._trial_id
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
            return None
        except optuna.exceptions.StorageInternalError:
            time.sleep(0.05 * (1 + _attempt % 5))  # a concurrent writer; try again
    raise MpsError("the study storage stays busy: cannot claim a trial (too many workers on SQLite? use PostgreSQL)")


class _Heartbeat:
    """One background thread per worker recording the heartbeat of the current trial (RDB)."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        get_interval = getattr(storage, "get_heartbeat_interval", None)
        self.enabled = bool(get_interval is not None and get_interval() is not None and hasattr(storage, "record_heartbeat"))
        self.trial_id: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def beat(self, trial_id: int | None) -> None:
        self.trial_id = trial_id
        if self.enabled and trial_id is not None:
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(trial_id)

    def _run(self) -> None:
        interval = self.storage.get_heartbeat_interval() or HEARTBEAT_INTERVAL_S
        while not self._stop.wait(interval):
            tid = self.trial_id
            if tid is not None:
                with contextlib.suppress(Exception):
                    self.storage.record_heartbeat(tid)

    def close(self) -> None:
        self._stop.set()


def run_worker(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], TrialOutcome],
    progress: bool = True,
    desc: str = "trials",
    timeout_s: float | None = None,
    after_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> dict[str, int]:
    """Claim and evaluate WAITING trials until none is left (or ``timeout_s`` passes).

    The objective returns a :class:`TrialOutcome`; raising :class:`TrialFailed` records the
    trial as FAILED with ``fail_reason`` and goes on. Any other exception (and Ctrl-C) fails
    the trial, enqueues its retry (so a rerun evaluates it) and propagates. Returns counts of
    what this worker did.
    """
    from tqdm.auto import tqdm

    reclaim_dead(study)
    me = worker_id()
    storage = study._storage
    total = int(study_sys_attrs(study).get(TICKETS_KEY) or 0)
    trials = study.get_trials(deepcopy=False)
    gone = retried_numbers(trials)
    done0 = sum(1 for t in trials if t.state.is_finished() and t.number not in gone)
    counts = {"complete": 0, "failed": 0}
    bar = tqdm(total=total or None, initial=min(done0, total) if total else done0, desc=desc, disable=not progress, leave=False)
    hb = _Heartbeat(storage)
    t_end = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while t_end is None or time.monotonic() < t_end:
            if hasattr(study, "_thread_local"):
                study._thread_local.cached_all_trials = None  # what Study.ask does each trial
            trial_id = _pop_waiting(study)
            if trial_id is None:
                if reclaim_dead(study):
                    continue
                break
            hb.beat(trial_id)
            storage.set_trial_system_attr(trial_id, OWNER_KEY, me)
            trial = optuna.trial.Trial(study, trial_id)
            state, frozen = _evaluate(study, trial, objective)
            counts["complete" if state == TrialState.COMPLETE else "failed"] += 1
            hb.beat(None)
            bar.update(1)
            if after_trial is not None and frozen is not None:
                after_trial(study, frozen)
    finally:
        hb.close()
        bar.close()
    return counts


def _evaluate(study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], TrialOutcome]) -> tuple[TrialState, Any]:
    try:
        out = objective(trial)
    except TrialFailed as exc:
        trial.set_user_attr("fail_reason", str(exc) or type(exc).__name__)
        return TrialState.FAIL, study.tell(trial, state=TrialState.FAIL)
    except BaseException as exc:  # Ctrl-C or a bug: keep the trial's ticket for a rerun
        reason = f"{type(exc).__name__}: {str(exc)[:300]}"
        with contextlib.suppress(Exception):
            trial.storage.set_trial_system_attr(trial._trial_id, STALE_KEY, True)
            trial.set_user_attr("fail_reason", reason)
            frozen = study.tell(trial, state=TrialState.FAIL)
            _enqueue_retry(study, frozen, reason)
        raise
    for k, v in out.user_attrs.items():
        trial.set_user_attr(k, v)
    bad = [v for v in out.values if not math.isfinite(v)]
    if bad:
        trial.set_user_attr("fail_reason", f"objective value not finite: {out.values}")
        return TrialState.FAIL, study.tell(trial, state=TrialState.FAIL)
    for k, v in out.constraints.items():
        trial.set_constraint(k, float(v))
    return TrialState.COMPLETE, study.tell(trial, out.values)


def trial_failures(study: optuna.Study) -> list[dict[str, Any]]:
    """Failed trials (not those of dead workers that were retried) with their reasons."""
    out = []
    trials = study.get_trials(deepcopy=False)
    gone = retried_numbers(trials)
    for t in trials:
        if t.state != TrialState.FAIL or t.number in gone:
            continue
        out.append({"trial": t.number, "reason": t.user_attrs.get("fail_reason", "unknown"),
                    "label": t.user_attrs.get("label"), "params_key": t.user_attrs.get("policy_key")})
    return out
