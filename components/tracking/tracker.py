"""What a stage logs through: :class:`Tracker`, which writes MLflow calls in the background and never lets a failing
store stop the work it records; and the values MLflow takes (:func:`flatten` params, :func:`numeric_items` metrics:
finite numbers, no COCO −1 sentinels).
"""
from __future__ import annotations

import collections
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from components.tracking.store import first_line, is_transient

FLUSH_ENV = "SLOTCON_TRACKING_FLUSH_S"  # how long a stage's end waits for buffered tracking calls


# --------------------------------------------------------------------------------------------------------------------
# what MLflow takes
# --------------------------------------------------------------------------------------------------------------------
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
    doubling to 30 s), and the queue catches up when the store is back; the stage meanwhile writes its metrics files
    and checkpoints as usual. A call MLflow refuses for good is dropped with a warning. :meth:`flush` waits for the
    queue (the stage's end).
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
            print(f"slotcon: warning: MLflow store {self.uri} is unavailable ({first_line(exc)}); tracking calls are "
                  "buffered and retried in the background, the stage goes on (metrics files and checkpoints are "
                  "written as usual)", file=sys.stderr, flush=True)

    def _drop(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        print(f"slotcon: warning: MLflow refused a {what} call ({first_line(exc)}); skipped", file=sys.stderr,
              flush=True)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued call is written (True) or ``timeout`` passes (False, one warning: the metrics
        files hold the figures). Default: ``$SLOTCON_TRACKING_FLUSH_S``, else 60 s."""
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
        from mlflow.entities import Param  # lazy: mlflow costs ~1 s at start-up; inactive trackers never load it

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params, prefix).items()]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._call("params", lambda c=chunk: self._client.log_batch(self.run_id, params=c))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric  # lazy: mlflow costs ~1 s at start-up; inactive trackers never load it

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step or 0) for k, v in numeric_items(metrics).items()]
        for i in range(0, len(items), 500):
            chunk = items[i : i + 500]
            self._call("metrics", lambda c=chunk: self._client.log_batch(self.run_id, metrics=c))
        self.last_metrics.update({m.key: m.value for m in items})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag  # lazy: mlflow costs ~1 s at start-up; inactive trackers never load it

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
