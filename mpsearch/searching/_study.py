"""Optuna studies that survive restarts and any ``kill -9``, shared between processes.

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

How a study is run (Optuna's own machinery, no private Optuna attribute):

* **Creation** writes O(1) rows: the study, its attributes and the seed trials
  (``Study.enqueue_trial(..., skip_if_exists=True)``), then the ``mpsearch:ready`` flag. It runs
  under a lock that dies with its holder (an ``fcntl`` lock next to a SQLite or journal file, a
  PostgreSQL advisory lock), so a creator killed half-way is finished by the next command: the
  seeds already enqueued are skipped, the missing ones added; nothing is enqueued twice.
* **Workers** run ``Study.optimize``: WAITING trials (seeds, retries) are popped first, then
  the sampler creates trials one at a time, so the first trial starts at once whatever
  ``n_trials`` is. A callback after every trial stops the worker when the study holds
  ``n_trials`` trials and none is WAITING. ``n_trials`` is the size the study should reach
  (seeds included); trials of dead workers that were retried do not count. One worker gives
  exactly ``n_trials``; W workers may each create one trial after another worker's last check,
  so a study ends with at most ``n_trials + W - 1`` trials (a dead worker's trial retried at the
  very end can add as many again).
* **A worker killed** leaves its trial RUNNING. It is failed and retried once, with the same
  parameters, by :class:`RetryStaleTrial` (Optuna's ``RetryHeartbeatStaleTrialCallback``):
  on the same host at once, found by the pid recorded on the trial (``mpsearch:owner``; a trial
  killed before its worker recorded itself is recognised because every worker registers on the
  study, ``mpsearch:worker:<host:pid:start>``, before it creates a trial, or after
  ``grace_period`` without an owner); on RDB storages also by Optuna's heartbeat
  (``heartbeat_interval`` 30 s, ``grace_period`` 120 s, checked by ``Study.optimize`` before
  every trial), which catches workers on other machines. The retry carries ``failed_trial`` /
  ``retry_history``; the trials it names do not count. A retry that cannot be enqueued is an
  error; a heartbeat that cannot be recorded is a logged warning (the beating goes on).

Example:
    >>> st = open_storage("sqlite:////tmp/s.db")                   # doctest: +SKIP
    >>> study, created = open_study(st, "demo", ["minimize"], sampler, n_trials=100)  # doctest: +SKIP
    >>> run_worker(study, objective, storage=st, n_trials=100)     # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import logging
import math
import os
import socket
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import optuna
from optuna.trial import TrialState

from mpsearch.hashing import json_key
from mpsearch.errors import MpsError

_log = logging.getLogger(__name__)

#: Study system attribute set when the study's creation (attributes and seeds) is complete.
READY_KEY = "mpsearch:ready"
#: Study system attribute: what the study was made for (see :func:`fingerprint`).
FINGERPRINT_KEY = "mpsearch:fingerprint"
#: Study system attribute: ``host:pid:start`` of the process that created the study.
CREATOR_KEY = "mpsearch:creator"
#: Study system attribute of studies made by mpsearch < 0.2 (all tickets enqueued up front).
LEGACY_TICKETS_KEY = "mpsearch:tickets"
#: Trial system attribute: ``host:pid:start`` of the worker evaluating it.
OWNER_KEY = "mpsearch:owner"
#: Trial system attribute: the slot of the study the trial fills (its number; a retry keeps the
#: slot of the trial it retries).
TICKET_KEY = "mpsearch:ticket"
#: Study system attribute prefix: ``mpsearch:worker:<host:pid:start>`` for every worker run.
WORKER_PREFIX = "mpsearch:worker:"
#: Trial system attribute on a trial failed because its worker died.
STALE_KEY = "mpsearch:stale"
#: Trial system attribute of a retry: why its original was retried.
RETRY_REASON_KEY = "mpsearch:retry_reason"
HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 120
#: Storages without a creation lock: how long a study's creation may make no progress before
#: another process finishes it.
READY_WAIT_S = 60.0
#: User attributes a retry inherits from the trial it retries.
_INHERITED_USER_ATTRS = ("seed", "label")


class TrialFailed(Exception):
    """Raised by an objective to record the trial as FAILED with a reason (the study goes on)."""


class RetryStaleTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's ``RetryHeartbeatStaleTrialCallback`` (retry without limit, same parameters),
    keeping only what the retry should inherit: the parameters, ``fixed_params`` of a seed, the
    trial's slot (``mpsearch:ticket``), ``failed_trial`` / ``retry_history`` and the seed's
    label; not the dead worker's id nor the failure's reason. Installed as the storage's
    heartbeat callback and called by :func:`reclaim_dead`; an error while enqueueing propagates.
    """

    def __init__(self, reason: str = "worker stopped sending heartbeats") -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=None)
        self.reason = reason

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str | None = None) -> None:
        clean = copy.deepcopy(trial)
        clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in _INHERITED_USER_ATTRS}
        sys_attrs = {k: v for k, v in trial.system_attrs.items() if k not in (OWNER_KEY, STALE_KEY, RETRY_REASON_KEY)}
        sys_attrs.setdefault(TICKET_KEY, trial.number)
        sys_attrs[RETRY_REASON_KEY] = reason or self.reason
        clean.system_attrs = sys_attrs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__call__(study, clean)
        _log.warning("trial %d of study %r: %s; enqueued a retry with the same parameters",
                     trial.number, study.study_name, reason or self.reason)


class _RDBStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` whose heartbeat failures are logged, not lost.

    Optuna records a trial's heartbeat from a thread that an exception would end without a
    word to the study (a traceback on stderr at most); the trial would then look stale to other
    workers after ``grace_period`` and be retried while it still runs. A failed beat (the
    database busy, the connection dropped) is logged as a warning here and the thread goes on
    beating at the next interval.
    """

    def record_heartbeat(self, trial_id: int) -> None:
        """Record the heartbeat of ``trial_id``; a failure is a logged warning (see the class doc)."""
        from sqlalchemy.exc import SQLAlchemyError

        try:
            super().record_heartbeat(trial_id)
        except (SQLAlchemyError, optuna.exceptions.OptunaError, OSError) as exc:
            _log.warning("heartbeat of trial id %d not recorded (%s: %s); other workers fail and retry a trial "
                         "without a heartbeat for %s s", trial_id, type(exc).__name__, str(exc).splitlines()[0][:200],
                         self.grace_period)


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

        storage = optuna.storages.JournalStorage(JournalFileBackend(path))
        _LOCK_FILES[storage] = path + ".mpsearch.lock"
        return storage
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
            "heartbeat_stale_trial_callback": RetryStaleTrial(),
        }
    if url.startswith("sqlite:"):
        return _sqlite_storage(url, kwargs)
    url = _postgres_driver(url)
    from sqlalchemy.exc import SQLAlchemyError

    engine_kwargs = {"pool_pre_ping": True}
    last: Exception | None = None
    for attempt in range(5):  # concurrent first-time table creation can collide: retry
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except ImportError as exc:
            raise MpsError(f"storage {redact(url)}: the database driver is missing ({exc}); for PostgreSQL: pip install psycopg2-binary") from None
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:  # e.g. two creators of the tables
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
            storage = _RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}, **kwargs)

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
    _LOCK_FILES[storage] = path + ".lock"
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


#: Lock file guarding study creation, per storage opened by :func:`open_storage` (file storages).
_LOCK_FILES: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _creation_lock(storage: optuna.storages.BaseStorage, study_name: str) -> Iterator[bool]:
    """Hold a lock that dies with this process while a study is created; yields whether one is held.

    SQLite and journal files: an ``fcntl`` lock on a file next to them. PostgreSQL / MySQL: an
    advisory lock (``pg_advisory_lock`` / ``GET_LOCK``) on a connection of the storage's engine.
    In memory: one process, nothing to lock. Anything else: no lock (``False``).
    """
    if isinstance(storage, optuna.storages.InMemoryStorage):
        yield True
        return
    path = _LOCK_FILES.get(storage)
    url = str(getattr(storage, "url", "") or "")
    if path is None and url.startswith("sqlite:///"):
        path = url.split(":///", 1)[1] + ".lock"
    if path is not None:
        with _file_lock(path):
            yield True
        return
    engine = getattr(storage, "engine", None) if isinstance(storage, optuna.storages.RDBStorage) else None
    dialect = getattr(getattr(engine, "dialect", None), "name", "")
    if engine is None or dialect not in ("postgresql", "mysql", "mariadb"):
        yield False
        return
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha1(f"mpsearch:{study_name}".encode()).digest()[:8], "big", signed=True)
    with engine.connect() as conn:
        if dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        else:
            conn.execute(text("SELECT GET_LOCK(:k, -1)"), {"k": f"mpsearch:{key}"})
        try:
            yield True
        finally:
            if dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            else:
                conn.execute(text("SELECT RELEASE_LOCK(:k)"), {"k": f"mpsearch:{key}"})
            conn.commit()


# -- studies ------------------------------------------------------------------------------------
def fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-able inputs (what a study was made for)."""
    return json_key(list(parts), default=_json_default)


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
    """Create or load ``study_name``; returns ``(study, created)``.

    Creating writes the study's attributes and enqueues the first ``n_trials`` of ``seeds``
    (parameter dicts, with ``seed_attrs`` user attributes) with
    ``enqueue_trial(skip_if_exists=True)``, then sets ``mpsearch:ready``: O(len(seeds)) writes,
    never O(n_trials). A study whose creator was killed before ``ready`` is finished here (see
    the module doc). A loaded study made for other inputs (another fingerprint) or with other
    objectives raises :class:`MpsError`.
    """
    if n_trials < 1:
        raise MpsError(f"n_trials must be at least 1, got {n_trials}")
    dirs = [optuna.study.StudyDirection.MINIMIZE if d == "minimize" else optuna.study.StudyDirection.MAXIMIZE for d in directions]
    with _creation_lock(storage, study_name) as locked:
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
        sid = storage.get_study_id_from_name(study_name)
        if created:
            storage.set_study_system_attr(sid, CREATOR_KEY, worker_id())
            if fingerprint_value:
                storage.set_study_system_attr(sid, FINGERPRINT_KEY, fingerprint_value)
        attrs = storage.get_study_system_attrs(sid)
        theirs = attrs.get(FINGERPRINT_KEY)
        if fingerprint_value and theirs is not None and theirs != fingerprint_value:
            raise MpsError(
                f"study {study_name!r} in this storage was made for other inputs (sensitivity, latency, "
                "space, budget or objectives differ): use another --study-name, or the same inputs to resume"
            )
        if _is_ready(attrs):
            return study, created
        if not created and not locked:
            if _wait_ready(study, storage, sid, wait_s):
                return study, False
        if created:
            _log.debug("creating study %r", study_name)
        else:
            _log.warning("study %r: its creation was interrupted (creator %s); finishing it",
                         study_name, attrs.get(CREATOR_KEY, "unknown"))
        if fingerprint_value and theirs is None:
            storage.set_study_system_attr(sid, FINGERPRINT_KEY, fingerprint_value)
        if metric_names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(metric_names))
        for k, v in (user_attrs or {}).items():
            study.set_user_attr(k, v)
        attrs_list = list(seed_attrs)
        for i, params in enumerate(list(seeds)[:n_trials]):
            ua = dict(attrs_list[i]) if i < len(attrs_list) else None
            study.enqueue_trial(dict(params), user_attrs=ua, skip_if_exists=True)
        storage.set_study_system_attr(sid, READY_KEY, True)
        return study, created


def _is_ready(attrs: Mapping[str, Any]) -> bool:
    return bool(attrs.get(READY_KEY)) or attrs.get(LEGACY_TICKETS_KEY) is not None


def _wait_ready(study: optuna.Study, storage: optuna.storages.BaseStorage, sid: int, wait_s: float) -> bool:
    """No creation lock (an RDB other than PostgreSQL/MySQL, a storage object made elsewhere):
    wait while the creator makes progress; ``False`` when it is dead or stalled for ``wait_s``."""
    deadline = time.monotonic() + wait_s
    last = -1
    while True:
        attrs = storage.get_study_system_attrs(sid)
        if _is_ready(attrs):
            return True
        creator = attrs.get(CREATOR_KEY)
        if creator and _owner_dead(str(creator)):
            return False
        n = len(study.get_trials(deepcopy=False))
        if n != last:
            last, deadline = n, time.monotonic() + wait_s
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def study_system_attrs(storage: optuna.storages.BaseStorage, study: optuna.Study) -> dict[str, Any]:
    """The study's system attributes (read from its storage)."""
    return dict(storage.get_study_system_attrs(storage.get_study_id_from_name(study.study_name)))


def retried_numbers(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of trials whose worker died and that were retried (they do not count).

    Read from the retries' ``retry_history`` (Optuna's retry callback), which names every trial
    of a chain of retries.
    """
    out: set[int] = set()
    for t in trials:
        hist = t.system_attrs.get("retry_history")
        if hist:
            out.update(int(n) for n in hist)
        elif "failed_trial" in t.system_attrs:
            out.add(int(t.system_attrs["failed_trial"]))
    return out


def count_trials(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """Trials that count against ``n_trials``: all but those retried after their worker died."""
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


def reclaim_dead(study: optuna.Study, storage: optuna.storages.BaseStorage,
                 trials: Sequence[optuna.trial.FrozenTrial] | None = None) -> int:
    """Fail the RUNNING trials of dead workers and enqueue one retry each; returns how many.

    Heartbeat-stale trials (RDB storages) are failed and retried by Optuna's
    ``fail_stale_trials``; trials of workers found dead by their pid on this host are failed
    here, atomically (``set_trial_state_values``: of several processes doing this at once, one
    wins and retries the trial). A retry that cannot be enqueued raises (the trial would be lost).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if trials is None:
        trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    sid: int | None = None
    peers_dead: bool | None = None
    retry = RetryStaleTrial()
    n = 0
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        owner = t.system_attrs.get(OWNER_KEY)
        if sid is None:
            sid = storage.get_study_id_from_name(study.study_name)
        if owner:
            if not _owner_dead(str(owner)):
                continue
            reason = f"worker died while evaluating it ({owner})"
        else:  # killed between Optuna creating the trial and the worker recording itself on it
            if peers_dead is None:
                peers_dead = _other_workers_dead(storage, sid)
            started = t.datetime_start
            age = (datetime.datetime.now() - started).total_seconds() if started is not None else 0.0
            if not (peers_dead or age > HEARTBEAT_GRACE_S):
                continue
            reason = "worker died while evaluating it (before it recorded itself on the trial)"
        tid = storage.get_trial_id_from_study_id_trial_number(sid, t.number)
        try:
            storage.set_trial_user_attr(tid, "fail_reason", reason)
            storage.set_trial_system_attr(tid, STALE_KEY, True)
            won = storage.set_trial_state_values(tid, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process failed it first (and retries it)
        if not won:
            continue
        try:
            retry(study, storage.get_trial(tid), reason)
        except Exception as exc:
            raise MpsError(f"trial {t.number} of study {study.study_name!r} was failed (its worker died) but its "
                           f"retry could not be enqueued: {type(exc).__name__}: {exc}") from exc
        n += 1
    return n


def _register_worker(storage: optuna.storages.BaseStorage, sid: int, me: str) -> None:
    """Record this worker on the study before it creates a trial (see :func:`_other_workers_dead`)."""
    storage.set_study_system_attr(sid, WORKER_PREFIX + me, round(time.time(), 3))


def _other_workers_dead(storage: optuna.storages.BaseStorage, sid: int) -> bool:
    """Whether every worker that ever ran on the study, but this process, is known to be dead
    (all on this host, their processes gone): then a RUNNING trial nobody recorded itself on
    was left by one of them."""
    me = worker_id()
    for key in storage.get_study_system_attrs(sid):
        if key.startswith(WORKER_PREFIX) and key[len(WORKER_PREFIX):] != me and not _owner_dead(key[len(WORKER_PREFIX):]):
            return False
    return True


# -- the worker loop -----------------------------------------------------------------------------
@dataclass
class TrialOutcome:
    """What an objective returns: objective values, constraints (<= 0 is feasible), user attrs."""

    values: list[float]
    constraints: dict[str, float]
    user_attrs: dict[str, Any]


def _more_to_do(study: optuna.Study, storage: optuna.storages.BaseStorage, n_trials: int) -> bool:
    """Whether this worker should take another trial: one is WAITING (a seed, a retry), or the
    study holds fewer than ``n_trials``, or a dead worker's trial was just put back."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    if count_trials(trials) < n_trials:
        return True
    return reclaim_dead(study, storage, trials) > 0


class _StopWhenFull:
    """``Study.optimize`` callback: counts, progress, and ``study.stop()`` once the study is full.

    Optuna's ``MaxTrialsCallback`` counts trials by state; the target here excludes the trials
    retried after their worker died and finishes WAITING seeds and retries, so it is computed
    from the study's trials.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, n_trials: int, bar: Any,
                 after_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None) -> None:
        self.storage, self.n_trials, self.bar, self.after_trial = storage, n_trials, bar, after_trial
        self.counts = {"complete": 0, "failed": 0}

    def __call__(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        self.counts["complete" if frozen.state == TrialState.COMPLETE else "failed"] += 1
        self.bar.update(1)
        if self.after_trial is not None:
            self.after_trial(study, frozen)
        if not _more_to_do(study, self.storage, self.n_trials):
            study.stop()


def run_worker(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], TrialOutcome],
    storage: optuna.storages.BaseStorage,
    n_trials: int,
    progress: bool = True,
    desc: str = "trials",
    timeout_s: float | None = None,
    after_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> dict[str, int]:
    """Evaluate trials with ``study.optimize`` until the study holds ``n_trials`` and none waits.

    Dead workers' trials are retried first (:func:`reclaim_dead`). The objective returns a
    :class:`TrialOutcome`; raising :class:`TrialFailed` records the trial as FAILED with
    ``fail_reason`` and goes on (so does a non-finite objective value). Any other exception
    (and Ctrl-C) fails the trial, enqueues its retry (so a rerun evaluates it) and propagates.
    ``timeout_s`` stops taking trials after that many seconds. Returns counts of what this
    worker did (``complete``, ``failed``).
    """
    from tqdm.auto import tqdm

    reclaim_dead(study, storage)
    if not _more_to_do(study, storage, n_trials):
        return {"complete": 0, "failed": 0}
    me = worker_id()
    sid = storage.get_study_id_from_name(study.study_name)
    _register_worker(storage, sid, me)
    trials = study.get_trials(deepcopy=False)
    gone = retried_numbers(trials)
    done0 = sum(1 for t in trials if t.state.is_finished() and t.number not in gone)
    bar = tqdm(total=max(n_trials, done0), initial=done0, desc=desc, disable=not progress, leave=False)
    stop = _StopWhenFull(storage, n_trials, bar, after_trial)
    current: dict[str, Any] = {}

    def wrapped(trial: optuna.Trial) -> list[float]:
        current["number"] = trial.number
        tid = storage.get_trial_id_from_study_id_trial_number(sid, trial.number)
        current["id"] = tid
        storage.set_trial_system_attr(tid, OWNER_KEY, me)
        if TICKET_KEY not in storage.get_trial_system_attrs(tid):  # a retry keeps the slot it inherited
            storage.set_trial_system_attr(tid, TICKET_KEY, trial.number)
        try:
            out = objective(trial)
        except TrialFailed as exc:
            current.clear()  # a failure of the trial itself: recorded, not retried
            trial.set_user_attr("fail_reason", str(exc) or type(exc).__name__)
            raise
        except BaseException as exc:  # a bug or Ctrl-C: say why; run_worker retries the trial
            _note_reason(trial, f"{type(exc).__name__}: {str(exc)[:300]}")
            raise
        for k, v in out.user_attrs.items():
            trial.set_user_attr(k, v)
        current.clear()
        if not all(math.isfinite(v) for v in out.values):
            trial.set_user_attr("fail_reason", f"objective value not finite: {out.values}")
            raise TrialFailed(f"objective value not finite: {out.values}")
        for k, v in out.constraints.items():
            trial.set_constraint(k, float(v))
        return [float(v) for v in out.values]

    verbosity = optuna.logging.get_verbosity()
    if verbosity < optuna.logging.WARNING:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per trial otherwise
    try:
        study.optimize(wrapped, timeout=timeout_s, catch=(TrialFailed,), callbacks=[stop])
    except BaseException as exc:
        if "id" in current:  # the objective failed (a bug, Ctrl-C): keep the trial for a rerun
            _retry_interrupted(study, storage, current["id"], f"{type(exc).__name__}: {str(exc)[:300]}")
        raise
    finally:
        if verbosity < optuna.logging.WARNING:
            optuna.logging.set_verbosity(verbosity)
        bar.close()
    return stop.counts


def _retry_interrupted(study: optuna.Study, storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> None:
    """After an objective raised: record why and enqueue one retry of the (now FAILED) trial.

    Runs while another exception propagates, so a failure here is logged as a warning rather
    than raised over the original error.
    """
    try:
        frozen = storage.get_trial(trial_id)
        if frozen.state == TrialState.RUNNING:  # Optuna did not tell it (an exception it does not catch)
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            storage.set_trial_system_attr(trial_id, STALE_KEY, True)
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                return
            frozen = storage.get_trial(trial_id)
        if frozen.state != TrialState.FAIL:
            return
        RetryStaleTrial()(study, frozen, f"interrupted: {reason}")
    except Exception as exc:  # noqa: BLE001 - never mask the original error, but say what was lost
        _log.warning("trial %s of study %r was interrupted (%s) and could NOT be re-enqueued (%s: %s): it stays "
                     "FAILED and a rerun will not evaluate it again", trial_id, study.study_name, reason,
                     type(exc).__name__, exc)


def _note_reason(trial: optuna.Trial, reason: str) -> None:
    """``fail_reason`` on a trial whose objective raised (a warning if even that fails)."""
    try:
        trial.set_user_attr("fail_reason", reason)
    except Exception as exc:  # noqa: BLE001 - the objective's error propagates; this one is reported
        _log.warning("trial %d: could not record its fail_reason (%s: %s)", trial.number, type(exc).__name__, exc)


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
