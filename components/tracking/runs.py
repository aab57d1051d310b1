"""MLflow record of every stage: store, stage runs, rank-0 guard, tags; tracking never kills the work it records.

- Store: ``sqlite:///mlflow.db`` at the repository root unless ``MLFLOW_TRACKING_URI`` is set (MLflow 3 rejects the
  old file store). :func:`open_store` (:mod:`components.tracking.store`, re-exported here) is the one way in: safe on
  first use by several processes, the experiment marked as model training, and an unusable store a one-line
  :class:`StoreError` naming the URI and the fix, before any work.
- :class:`Tracker`: once a run is open, a failing store call (locked, gone read-only, disk full) is never what stops
  a stage. Calls are written in order by a background thread; a failing one stays queued, one warning is printed,
  retries back off and the queue catches up when the store is back; the stage meanwhile writes its metrics files and
  checkpoints as usual. At the stage's end the queue gets ``$SLOTCON_TRACKING_FLUSH_S`` (default 60 s) to drain; what
  still can't be written is reported in one warning (the metrics files hold the figures).
- Runs: :func:`stage_run` opens one run per stage, a child of the pipeline's parent run
  (:mod:`components.tracking.parent`: the Prefect flow's, or the one shared by the stages of one ``dvc repro``).
- COCO's −1 ("no objects of that size") is not a value: :func:`is_sentinel` metrics are never logged.
- Only rank 0 writes; on other ranks, or with ``tracking.enabled: false``, every call does nothing.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before any mlflow import
os.environ.setdefault("DO_NOT_TRACK", "1")

from components.config import Section, TrackingConfig  # noqa: E402
from components.tracking.store import (  # noqa: E402,F401 - the store's API, re-exported for stages and tests
    EXPERIMENT_KIND, WAIT_ENV, StoreError, _first_line, artifact_uri, create_run, ensure_experiment, first_use_lock,
    is_transient, open_store, quiet_mlflow_logs, sqlite_path, store_problem, tracking_uri)

PARENT_ENV = "SLOTCON_PARENT_RUN_ID"
FLOW_RUN_ENV = "SLOTCON_FLOW_RUN_ID"
FLUSH_ENV = "SLOTCON_TRACKING_FLUSH_S"  # how long a stage's end waits for buffered tracking calls


# --------------------------------------------------------------------------------------------------------------------
# small facts
# --------------------------------------------------------------------------------------------------------------------
def git_commit(cwd: str | os.PathLike | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dvc_lock_hash(path: str | os.PathLike = "dvc.lock") -> str:
    p = Path(path)
    return hashlib.md5(p.read_bytes()).hexdigest() if p.is_file() else "none"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}} -> {'a.b': 1}``; lists become their JSON text (MLflow params are strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v))
        else:
            out[key] = v
    return out


_COCO_STAT = re.compile(r"(^|[/._])(bbox|segm|keypoints)?_?A[PR](50|75|s|m|l|1|10|100)?$")


def is_sentinel(key: str, value: float) -> bool:
    """COCOeval's −1 means "no objects of that size/kind", not a score: such values are not logged."""
    return value == -1.0 and bool(_COCO_STAT.search(key))


def numeric_items(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The loggable figures of a (nested) metrics dict: numbers only, no NaN/inf, no COCO −1 sentinels."""
    out: dict[str, float] = {}
    for k, v in flatten(metrics).items():
        if isinstance(v, bool):
            v = int(v)
        if hasattr(v, "item") and not isinstance(v, (int, float)):
            v = v.item()
        if isinstance(v, (int, float)) and math.isfinite(v) and not is_sentinel(k, float(v)):
            out[k] = float(v)
    return out


# --------------------------------------------------------------------------------------------------------------------
# the tracker
# --------------------------------------------------------------------------------------------------------------------
class Tracker:
    """What a stage logs through. All methods are no-ops when ``active`` is False (disabled, or not rank 0).

    Every call is queued and written in order by one background thread, so a training loop never waits on the store
    (MLflow's SQLite store waits up to 20 s on a lock before it fails). A store failure that may pass (locked,
    read-only for now, disk full) keeps the call at the head of the queue: one warning, retries with backoff (1 s
    doubling to 30 s), and the queue catches up when the store is back. A call MLflow refuses for good is dropped
    with a warning. :meth:`flush` waits for the queue (the stage's end).
    """

    def __init__(self, run_id: str | None = None, client: Any = None, uri: str = ""):
        self.run_id = run_id
        self._client = client
        self.uri = uri
        self.last_metrics: dict[str, float] = {}
        self._queue: collections.deque[tuple[str, Callable[[], Any]]] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._down = False  # the store failed and has not answered since
        self._warned = False
        self._spool: tempfile.TemporaryDirectory | None = None  # copies of files logged while the store is down
        self.failures = 0

    @property
    def active(self) -> bool:
        return self.run_id is not None

    @property
    def pending(self) -> int:
        return len(self._queue)

    # ---- the queue ------------------------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], Any]) -> None:
        if not self.active:
            return
        with self._cond:
            self._queue.append((what, fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name="slotcon-tracking", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _worker(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.notify_all()  # wakes flush()
                    self._cond.wait()
                what, fn = self._queue[0]
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - tracking never stops the stage
                if is_transient(exc):
                    self.failures += 1
                    self._went_down(exc)
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                self._drop(what, exc)
            delay = 1.0
            with self._cond:
                self._queue.popleft()
                if self._down and not self._queue:
                    self._down = False
                    print(f"slotcon: MLflow store {self.uri} is back; buffered tracking calls written",
                          file=sys.stderr, flush=True)

    def _went_down(self, exc: BaseException) -> None:
        self._down = True
        if not self._warned:
            self._warned = True
            print(f"slotcon: warning: MLflow store {self.uri} is unavailable ({_first_line(exc)}); tracking calls are "
                  "buffered and retried in the background, the stage goes on (metrics files and checkpoints are "
                  "written as usual)", file=sys.stderr, flush=True)

    def _drop(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        print(f"slotcon: warning: MLflow refused a {what} call ({_first_line(exc)}); skipped", file=sys.stderr,
              flush=True)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued call is written (True) or ``timeout`` passes (False, one warning)."""
        timeout = float(os.environ.get(FLUSH_ENV, "60")) if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue and time.monotonic() < deadline:
                self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            left = list(self._queue)
        if left:
            kinds = collections.Counter(w for w, _ in left)
            print(f"slotcon: warning: MLflow store {self.uri} still unavailable after {timeout:.0f} s; {len(left)} "
                  f"tracking call(s) not written ({dict(kinds)}); the stage's metrics files hold its figures",
                  file=sys.stderr, flush=True)
            return False
        if self._spool is not None:
            self._spool.cleanup()
            self._spool = None
        return True

    def _keep_copy(self, path: Path) -> Path:
        """Calls are written later: a logged file (often in a temp dir, or rewritten each epoch) may change or vanish
        by then, so the queue gets a private copy (artifacts here are pictures and small files)."""
        if self._spool is None:
            self._spool = tempfile.TemporaryDirectory(prefix="slotcon-tracking-")
        dst = Path(tempfile.mkdtemp(dir=self._spool.name)) / path.name
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, dst)
        return dst

    # ---- what stages call -----------------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params, prefix).items()]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._call("params", lambda c=chunk: self._client.log_batch(self.run_id, params=c))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step or 0) for k, v in numeric_items(metrics).items()]
        for i in range(0, len(items), 500):
            chunk = items[i : i + 500]
            self._call("metrics", lambda c=chunk: self._client.log_batch(self.run_id, metrics=c))
        self.last_metrics.update({m.key: m.value for m in items})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        self._call("tags", lambda: self._client.log_batch(self.run_id, tags=items))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        p = Path(path)
        if not p.exists():
            return
        p = self._keep_copy(p)
        if p.is_dir():
            self._call("artifacts", lambda: self._client.log_artifacts(self.run_id, str(p), artifact_path))
        else:
            self._call("artifacts", lambda: self._client.log_artifact(self.run_id, str(p), artifact_path))

    def log_dict(self, obj: Any, name: str) -> None:
        if not self.active:
            return
        text = json.dumps(obj, indent=2, default=str)
        self._call("artifacts", lambda: self._client.log_text(self.run_id, text, name))

    def log_figure(self, fig: Any, name: str) -> None:
        if not self.active:
            return
        buf = io.BytesIO()
        fig.savefig(buf, format=Path(name).suffix.lstrip(".") or "png", bbox_inches="tight")
        data = buf.getvalue()

        def write() -> None:
            with tempfile.TemporaryDirectory() as d:
                f = Path(d) / Path(name).name
                f.write_bytes(data)
                parent = str(Path(name).parent) if str(Path(name).parent) != "." else None
                self._client.log_artifact(self.run_id, str(f), parent)

        self._call("artifacts", write)

    def log_inputs(self, datasets: list[Any]) -> None:
        """MLflow dataset inputs (``mlflow.entities.DatasetInput``): the run's lineage."""
        if not self.active or not datasets:
            return
        self._call("datasets", lambda: self._client.log_inputs(self.run_id, datasets=datasets))

    def terminate(self, status: str) -> None:
        if not self.active:
            return
        end = int(time.time() * 1000)
        self._call("status", lambda: self._client.set_terminated(self.run_id, status=status, end_time=end))


# --------------------------------------------------------------------------------------------------------------------
# stage runs
# --------------------------------------------------------------------------------------------------------------------
def _params_dict(params: Section | Mapping[str, Any] | None) -> dict[str, Any]:
    if params is None:
        return {}
    if isinstance(params, Section):
        return params.model_dump()
    return dict(params)


def start_system_metrics(run_id: str, uri: str, interval_s: float = 5.0) -> Any:
    """MLflow's system metrics (CPU, memory, disk, network; GPU through nvidia-ml-py where present) for the run."""
    import logging

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no INFO start/stop lines in the console
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                       tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - a missing probe must not stop training
        print(f"slotcon: warning: MLflow system metrics off ({_first_line(exc)})", file=sys.stderr)
        return None


def stop_system_metrics(monitor: Any) -> None:
    """Stop MLflow's monitor; a stage shorter than one sampling interval gets the one sample it took.

    (The monitor publishes only after a whole interval; a shutdown during the first wait drops the sample it
    collected, so a short stage had no system metrics at all.)"""
    first_step = monitor._logging_step
    monitor.finish()
    if monitor._logging_step == first_step:
        metrics = monitor.aggregate_metrics()
        if metrics:
            monitor.publish_metrics(metrics)
            monitor.mlflow_logger.flush()


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Section | Mapping[str, Any] | None = None,
    cfg: TrackingConfig | None = None,
    *,
    rank: int | None = None,
    tags: Mapping[str, Any] | None = None,
    metrics_files: list[str] | None = None,
    system_metrics: bool = False,
) -> Iterator[Tracker]:
    """One MLflow run for one stage, logged by rank 0 only; yields a :class:`Tracker`.

    Its parent: ``$SLOTCON_PARENT_RUN_ID`` (the Prefect flow's), else the parent of the ``dvc repro`` / ``dvc exp run``
    that launched this stage (:func:`components.tracking.parent.dvc_parent`), else none (a stage run by hand). With a
    ``dvc repro`` parent, the stage's headline metrics files (``metrics_files``, default: what ``dvc.yaml`` declares
    for ``$DVC_STAGE``) are copied onto the parent when the stage ends. The run ends FINISHED, or FAILED if the block
    raises. An unusable store is a :class:`StoreError` before the block runs; a store failing later never raises.
    """
    from components.tracking import parent as pipeline_run

    cfg = cfg or TrackingConfig()
    if rank is None:  # torch only if this process already uses it (a tiny script's stage need not import it)
        if "torch.distributed" in sys.modules:
            from components import dist

            rank = dist.get_rank()
        else:
            rank = int(os.environ.get("RANK", "0"))
    if not cfg.enabled or rank != 0:
        yield Tracker()
        return
    uri = tracking_uri(cfg)
    client, exp_id = open_store(cfg)
    all_tags = {"slotcon.stage": stage, "mlflow.runName": stage, "git.commit": git_commit(),
                "dvc.lock.md5": dvc_lock_hash()}
    parent = os.environ.get(PARENT_ENV) or None
    implicit = None if parent else pipeline_run.dvc_parent(client, exp_id, cfg)
    parent = parent or implicit
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    if os.environ.get(FLOW_RUN_ENV):
        all_tags["prefect.flow_run_id"] = os.environ[FLOW_RUN_ENV]
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    run = create_run(client, exp_id, all_tags, stage, uri)
    tracker = Tracker(run.info.run_id, client, uri)
    tracker.log_params(_params_dict(params), prefix=f"{stage}.")
    monitor = start_system_metrics(run.info.run_id, uri) if system_metrics else None
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        if monitor is not None:
            with contextlib.suppress(Exception):
                stop_system_metrics(monitor)
        tracker.terminate(status)
        tracker.flush()
        if implicit:
            with contextlib.suppress(Exception):
                pipeline_run.close_dvc_parent(client, implicit, stage, status, metrics_files, uri)


def log_json_artifact(tracker: Tracker, obj: Any, name: str) -> None:
    """Small helper for metric files: log ``obj`` as the JSON artifact ``name``."""
    tracker.log_dict(obj, name)
