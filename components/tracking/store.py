"""The MLflow store: opened one way, checked before any work, its trouble said in one line.

:func:`open_store` is the one way in: under a per-store file lock (several processes migrating a fresh SQLite store at
once race: "table _alembic_tmp_experiments already exists") it opens the store, creates the experiment with an
explicit artifact location and marks it a model-training experiment (``mlflow.experimentKind``; MLflow 3 otherwise
opens it on the GenAI traces overview). That tag write doubles as the write probe: a store that is garbage, read-only
or locked for longer than ``$SLOTCON_TRACKING_WAIT_S`` (default 30 s) is a one-line :class:`StoreError` naming the URI
and the fix. :func:`is_transient` tells store trouble that may pass (worth buffering) from a refusal.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before any mlflow import
os.environ.setdefault("DO_NOT_TRACK", "1")

from components.config import TrackingConfig  # noqa: E402
from components.errors import UserError  # noqa: E402

WAIT_ENV = "SLOTCON_TRACKING_WAIT_S"  # how long a locked store may delay a stage's start
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3 UI: land on the runs table, not the GenAI overview


def quiet_mlflow_logs() -> None:
    """MLflow logs each store failure with a full traceback (and its migrations at INFO): we report store trouble
    ourselves, in one line, so those loggers only speak up for what we don't handle."""
    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("mlflow.store.tracking.sqlalchemy_store").setLevel(logging.CRITICAL)
    logging.getLogger("alembic").setLevel(logging.WARNING)


class StoreError(UserError):
    """The MLflow store can't be used: one line with the URI and the fix."""


def tracking_uri(cfg: TrackingConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def artifact_uri(cfg: TrackingConfig) -> str:
    loc = cfg.artifact_location
    if "://" in loc:
        return loc
    return Path(loc).resolve().as_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?")[0]).resolve()


@contextlib.contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a SQLite store across processes (its schema migrations race otherwise)."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    name = "slotcon-mlflow-" + hashlib.md5(str(db).encode()).hexdigest()[:16] + ".lock"
    with open(Path(tempfile.gettempdir()) / name, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\(sqlite3\.\w+\)\s*", "", text)[:200]


_TRANSIENT = ("locked", "readonly", "read-only", "unable to open", "disk", "i/o", "connection", "timed out",
              "temporar", "busy", "no such table")


def is_transient(exc: BaseException) -> bool:
    """A store failure that may pass (locked, read-only for now, disk full, server away): worth buffering. Anything
    else (MLflow refusing a value) would fail the same way forever: such a call is dropped with a warning."""
    text = str(exc).lower()
    return any(t in text for t in _TRANSIENT) or type(exc).__name__ in ("OperationalError", "ConnectionError")


def _is_locked(exc: BaseException) -> bool:
    return "database is locked" in str(exc) or "database table is locked" in str(exc)


def store_problem(uri: str, exc: BaseException, waited: float = 0.0) -> str:
    """One line: which store, what is wrong, how to fix it."""
    text = str(exc)
    where = f"MLflow store {uri}"
    off = "or switch tracking off (tracking.enabled: false in params.yaml)"
    db = sqlite_path(uri)
    if "file is not a database" in text or "malformed" in text:
        return (f"{where} is not a usable SQLite database (damaged or not MLflow's): move {db} away (a fresh store is "
                f"created on the next run) or set MLFLOW_TRACKING_URI / tracking.tracking_uri to another store, {off}")
    if any(t in text for t in ("readonly", "read-only", "unable to open database", "disk I/O error")):
        return (f"{where} can't be written ({_first_line(exc)}): make {db} and its folder writable "
                f"(ls -l, chattr -i, a read-only mount?) or point MLFLOW_TRACKING_URI elsewhere, {off}")
    if _is_locked(exc):
        return (f"{where} stayed locked by another process for {waited:.0f} s: let that process finish (an open "
                f"`sqlite3` shell, a crashed writer: `fuser {db}`), raise ${WAIT_ENV}, {off}")
    return f"{where} can't be used ({type(exc).__name__}: {_first_line(exc)}): check the URI, {off}"


def open_store(cfg: TrackingConfig, wait_s: float | None = None) -> tuple[Any, str]:
    """``(MlflowClient, experiment id)``, the experiment created and marked as model training; raises
    :class:`StoreError` (one line) when the store is unusable. Waits up to ``wait_s`` for a locked store."""
    import mlflow

    quiet_mlflow_logs()
    uri = tracking_uri(cfg)
    wait_s = float(os.environ.get(WAIT_ENV, "30")) if wait_s is None else wait_s
    db = sqlite_path(uri)
    if db is not None and not db.parent.is_dir():
        raise StoreError(f"MLflow store {uri}: folder {db.parent} does not exist (create it or fix the URI)")
    mlflow.set_tracking_uri(uri)  # for code on MLflow's fluent API in this process (mlflow.pytorch.log_model)
    t0, delay = time.monotonic(), 0.5
    while True:
        try:
            with first_use_lock(uri):
                client = mlflow.MlflowClient(uri)
                exp = client.get_experiment_by_name(cfg.experiment)
                if exp is None:
                    exp_id = client.create_experiment(cfg.experiment, artifact_location=artifact_uri(cfg))
                else:
                    exp_id = exp.experiment_id
                if exp is None or exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND:
                    client.set_experiment_tag(exp_id, "mlflow.experimentKind", EXPERIMENT_KIND)
                else:  # the write probe: a read-only store must fail here, before any work
                    client.set_experiment_tag(exp_id, "slotcon.last_opened", str(int(time.time())))
            return client, exp_id
        except Exception as exc:  # noqa: BLE001 - any failure becomes one line
            waited = time.monotonic() - t0
            if _is_locked(exc) and waited + delay < wait_s:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            raise StoreError(store_problem(uri, exc, waited)) from None


def ensure_experiment(cfg: TrackingConfig) -> str | None:
    """Create (or find) the experiment before ``torchrun`` starts the ranks; None when tracking is disabled."""
    if not cfg.enabled:
        return None
    return open_store(cfg)[1]


def create_run(client: Any, exp_id: str, tags: Mapping[str, str], name: str, uri: str) -> Any:
    """``create_run`` with the same wait for a locked store as :func:`open_store` (no work has started yet)."""
    wait_s, t0, delay = float(os.environ.get(WAIT_ENV, "30")), time.monotonic(), 0.5
    while True:
        try:
            return client.create_run(exp_id, tags=dict(tags), run_name=name)
        except Exception as exc:  # noqa: BLE001
            waited = time.monotonic() - t0
            if _is_locked(exc) and waited + delay < wait_s:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            raise StoreError(store_problem(uri, exc, waited)) from None


