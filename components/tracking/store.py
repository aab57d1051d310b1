"""The MLflow store: which one (URI, artifact location), opened one way, and its trouble said in one line.

:func:`open_store` is the one way in: the experiment created and marked for model training, and a store that can't be
used a one-line :class:`StoreError` naming the URI and the fix, before any work. :func:`is_transient` tells store
trouble that may pass (worth buffering) from a refusal.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before any mlflow import
os.environ.setdefault("DO_NOT_TRACK", "1")

from components.config import TrackingConfig  # noqa: E402
from components.errors import UserError  # noqa: E402

WAIT_ENV = "SLOTCON_TRACKING_WAIT_S"  # how long a locked store may delay a stage's start
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3 UI: land on the runs table, not the GenAI overview

T = TypeVar("T")


def quiet_mlflow_logs() -> None:
    """MLflow logs each store failure with a full traceback (and its migrations at INFO): we report store trouble
    ourselves, in one line, so those loggers only speak up for what we don't handle."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("mlflow.store.tracking.sqlalchemy_store").setLevel(logging.CRITICAL)
    logging.getLogger("alembic").setLevel(logging.WARNING)


class StoreError(UserError):
    """The MLflow store can't be used: one line with the URI and the fix."""


EXPERIMENT_ENV = "SLOTCON_EXPERIMENT"  # overrides tracking.experiment
ARTIFACTS_ENV = "SLOTCON_ARTIFACT_LOCATION"  # overrides tracking.artifact_location
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}  # a few seconds per call: our own waits bound the total
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def tracking_uri(cfg: TrackingConfig) -> str:
    """``$MLFLOW_TRACKING_URI``, else ``tracking.tracking_uri`` (``sqlite:///mlflow.db``: MLflow 3 rejects the old
    file store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def has_scheme(loc: str) -> bool:
    """``s3://b/x``, ``mlflow-artifacts:/x``, ``file:///x``: a URI, not a folder (``mlflow-artifacts:/x`` has no ``://``)."""
    return bool(_SCHEME.match(loc))


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def resolved(cfg: TrackingConfig) -> TrackingConfig:
    """``cfg`` with the environment's overrides: ``$MLFLOW_TRACKING_URI``, ``$SLOTCON_EXPERIMENT``,
    ``$SLOTCON_ARTIFACT_LOCATION``."""
    update = {"tracking_uri": tracking_uri(cfg)}
    if os.environ.get(EXPERIMENT_ENV):
        update["experiment"] = os.environ[EXPERIMENT_ENV]
    if os.environ.get(ARTIFACTS_ENV):
        update["artifact_location"] = os.environ[ARTIFACTS_ENV]
    return cfg.model_copy(update=update)


def artifact_uri(cfg: TrackingConfig) -> str | None:
    """The artifact root a new experiment gets: a URI as given (``s3://``, ``mlflow-artifacts:/x``); a local folder as
    a ``file://`` URI for a local store; None (the server's own proxied store) for an MLflow server, unless
    ``$SLOTCON_ARTIFACT_LOCATION`` or a URI says otherwise: a folder on this machine is useless to a teammate.
    ``mlflow-artifacts:`` with a local store is a :class:`StoreError` (only a server serves it)."""
    cfg = resolved(cfg)
    loc, uri = cfg.artifact_location, cfg.tracking_uri
    if loc.startswith("mlflow-artifacts:"):
        if not is_server(uri):
            raise StoreError(f"artifact location {loc} needs an MLflow server, but the tracking URI is {uri}: set "
                             f"MLFLOW_TRACKING_URI to the server (http://host:port) or use a folder or s3:// location")
        rest = loc[len("mlflow-artifacts:"):]
        if rest.startswith("//") and not rest.startswith("///"):
            return loc  # mlflow-artifacts://host:port/path: a server named in the URI
        return "mlflow-artifacts:/" + rest.lstrip("/")  # one slash or three: the tracking server's own store
    if has_scheme(loc):
        return loc
    if is_server(uri) and not os.environ.get(ARTIFACTS_ENV):
        return None
    return Path(loc).resolve().as_uri()


def http_settings(uri: str) -> None:
    """For a server: MLflow's HTTP retries bounded to seconds (its default retries for ~4 minutes, silently), unless
    the user set them. The store check and the tracker's backoff do the waiting, with their own limits."""
    if is_server(uri):
        for k, v in HTTP_ENV.items():
            os.environ.setdefault(k, v)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?")[0]).resolve()


@contextlib.contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a SQLite store across processes: several processes migrating a fresh store at once
    race ("table _alembic_tmp_experiments already exists")."""
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


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (at most 200 characters), without SQLite's ``(sqlite3.X)`` prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\(sqlite3\.\w+\)\s*", "", text)[:200]


_TRANSIENT = ("locked", "readonly", "read-only", "unable to open", "disk", "i/o", "connection", "timed out",
              "temporar", "busy", "no such table", "max retries exceeded", "error code 502", "error code 503",
              "error code 504", "too many 50", "remotedisconnected", "read timed out")


def is_transient(exc: BaseException) -> bool:
    """A store failure that may pass (locked, read-only for now, disk full, server away): worth buffering. Anything
    else (MLflow refusing a value) would fail the same way forever: such a call is dropped with a warning."""
    text = str(exc).lower()
    return any(t in text for t in _TRANSIENT) or type(exc).__name__ in ("OperationalError", "ConnectionError")


def _is_locked(exc: BaseException) -> bool:
    return "database is locked" in str(exc) or "database table is locked" in str(exc)


def _is_away(uri: str, exc: BaseException) -> bool:
    """A server that does not answer (down, restarting, a proxy's 5xx): worth waiting for at the start."""
    return is_server(uri) and is_transient(exc) and not _refusal(exc)


def _refusal(exc: BaseException) -> str | None:
    """``"401"`` / ``"403"`` when the server refused us (MLflow's basic-auth app), else None."""
    text = str(exc)
    code = str(getattr(exc, "error_code", ""))
    if "UNAUTHENTICATED" in code or re.search(r"\b401\b|not authenticated|unauthori[sz]ed", text, re.I):
        return "401"
    if "PERMISSION_DENIED" in code or re.search(r"\b403\b|permission denied|forbidden", text, re.I):
        return "403"
    return None


def _server_problem(uri: str, exc: BaseException, waited: float, experiment: str) -> str | None:
    where = f"MLflow server {uri}"
    refused = _refusal(exc)
    if refused == "401":
        return (f"{where} refused us (401, not authenticated): set MLFLOW_TRACKING_USERNAME and "
                f"MLFLOW_TRACKING_PASSWORD (a user of its basic-auth app)")
    if refused == "403":
        return (f"{where} refused us (403, permission denied): the user needs EDIT on experiment '{experiment}' "
                f"(stages write runs and tags; READ only views), and EDIT on the registered model for `slotcon "
                f"export` / `make promote` (MANAGE to grant others); ask its admin")
    if is_transient(exc):
        return (f"{where} did not answer for {waited:.0f} s ({first_line(exc)[:120]}): start it (`slotcon stack up`"
                f" here), check MLFLOW_TRACKING_URI, raise ${WAIT_ENV}, or switch tracking off "
                f"(tracking.enabled: false in params.yaml)")
    return None


def store_problem(uri: str, exc: BaseException, waited: float = 0.0, experiment: str = "") -> str:
    """One line: which store, what is wrong, how to fix it."""
    text = str(exc)
    if is_server(uri):
        said = _server_problem(uri, exc, waited, experiment)
        if said:
            return said
    where = f"MLflow store {uri}"
    off = "or switch tracking off (tracking.enabled: false in params.yaml)"
    db = sqlite_path(uri)
    if "file is not a database" in text or "malformed" in text:
        return (f"{where} is not a usable SQLite database (damaged or not MLflow's): move {db} away (a fresh store is "
                f"created on the next run) or set MLFLOW_TRACKING_URI / tracking.tracking_uri to another store, {off}")
    if any(t in text for t in ("readonly", "read-only", "unable to open database", "disk I/O error")):
        return (f"{where} can't be written ({first_line(exc)}): make {db} and its folder writable "
                f"(ls -l, chattr -i, a read-only mount?) or point MLFLOW_TRACKING_URI elsewhere, {off}")
    if _is_locked(exc):
        return (f"{where} stayed locked by another process for {waited:.0f} s: let that process finish (an open "
                f"`sqlite3` shell, a crashed writer: `fuser {db}`), raise ${WAIT_ENV}, {off}")
    return f"{where} can't be used ({type(exc).__name__}: {first_line(exc)}): check the URI, {off}"


def _wait_s() -> float:
    return float(os.environ.get(WAIT_ENV, "30"))


def _while_locked(uri: str, wait_s: float, fn: Callable[[], T], experiment: str = "") -> T:
    """``fn()``, called again while the store is locked or the server away (0.5 s doubling to 5 s) for up to
    ``wait_s``; any other failure, or one that outlasts ``wait_s``, is a :class:`StoreError` (one line)."""
    t0, delay = time.monotonic(), 0.5
    while True:
        try:
            return fn()
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure becomes one line
            waited = time.monotonic() - t0
            if (_is_locked(exc) or _is_away(uri, exc)) and waited + delay < wait_s:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            raise StoreError(store_problem(uri, exc, time.monotonic() - t0, experiment)) from None


def open_store(cfg: TrackingConfig, wait_s: float | None = None) -> tuple[Any, str]:
    """``(MlflowClient, experiment id)``, the experiment created and marked as model training; raises
    :class:`StoreError` (one line) when the store is unusable. Waits up to ``wait_s`` (default
    ``$SLOTCON_TRACKING_WAIT_S``, else 30 s) for a locked store.

    Under :func:`first_use_lock` it creates the experiment with an explicit artifact location and tags it
    ``mlflow.experimentKind`` (MLflow 3 otherwise opens it on the GenAI traces overview); that tag write (or, once
    tagged, ``slotcon.last_opened``) is the write probe: a read-only store fails here, before any work.
    """
    import mlflow  # lazy: mlflow costs ~1 s at start-up; a stage without tracking never loads it

    quiet_mlflow_logs()
    cfg = resolved(cfg)
    uri = cfg.tracking_uri
    http_settings(uri)
    wait_s = _wait_s() if wait_s is None else wait_s
    location = artifact_uri(cfg)  # a bad location is one line before the store is touched
    db = sqlite_path(uri)
    if db is not None and not db.parent.is_dir():
        raise StoreError(f"MLflow store {uri}: folder {db.parent} does not exist (create it or fix the URI)")
    mlflow.set_tracking_uri(uri)  # for code on MLflow's fluent API in this process (mlflow.pytorch.log_model)

    def attempt() -> tuple[Any, str]:
        with first_use_lock(uri):
            client = mlflow.MlflowClient(uri)
            exp = client.get_experiment_by_name(cfg.experiment)
            if exp is None:
                exp_id = client.create_experiment(cfg.experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            if exp is None or exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND:
                client.set_experiment_tag(exp_id, "mlflow.experimentKind", EXPERIMENT_KIND)
            else:  # the write probe: a read-only store must fail here, before any work
                client.set_experiment_tag(exp_id, "slotcon.last_opened", str(int(time.time())))
        return client, exp_id

    return _while_locked(uri, wait_s, attempt, cfg.experiment)


def ensure_experiment(cfg: TrackingConfig) -> str | None:
    """Create (or find) the experiment before ``torchrun`` starts the ranks; None when tracking is disabled."""
    if not cfg.enabled:
        return None
    return open_store(cfg)[1]


def create_run(client: Any, exp_id: str, tags: Mapping[str, str], name: str, uri: str) -> Any:
    """``create_run`` with the same wait for a locked store as :func:`open_store` (no work has started yet)."""
    return _while_locked(uri, _wait_s(), lambda: client.create_run(exp_id, tags=dict(tags), run_name=name))
