"""MLflow record of every stage: store URI, parent/child runs, rank-0 guard, git/DVC tags; a no-op when disabled.

- Store: ``sqlite:///mlflow.db`` at the repository root unless ``MLFLOW_TRACKING_URI`` is set (MLflow 3 rejects the
  old file store). The experiment is created with an explicit local artifact location, and it must exist before a
  multi-process stage starts: several processes migrating a fresh SQLite store at once race (call
  :func:`ensure_experiment` before ``torchrun``).
- Runs: :func:`stage_run` opens one run per stage. If ``SLOTCON_PARENT_RUN_ID`` is set (by the Prefect flow or
  ``slotcon`` wrappers), the run is a child of that pipeline run. Tags: stage, git commit, ``dvc.lock`` hash, flow run.
- A plain ``dvc repro`` / ``dvc exp run`` (no flow) gets a parent too: the stage finds the ``dvc`` process that launched
  it among its ancestors, and all stages of that one DVC invocation share a parent run tagged
  ``slotcon.dvc_invocation=<host>:<pid>:<start time>`` (created by the first stage, found by the next ones). Each stage
  copies its final metrics onto it (``<stage>.<metric>``) and ends it FINISHED (FAILED if the stage failed); the next
  stage sets it RUNNING again. A stage run by hand (``slotcon pretrain ...``) is a top-level run.
- Only rank 0 writes; on other ranks, or with ``tracking.enabled: false``, every call does nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before any mlflow import
os.environ.setdefault("DO_NOT_TRACK", "1")

from components.config import Section, TrackingConfig  # noqa: E402

PARENT_ENV = "SLOTCON_PARENT_RUN_ID"
FLOW_RUN_ENV = "SLOTCON_FLOW_RUN_ID"


def tracking_uri(cfg: TrackingConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def artifact_uri(cfg: TrackingConfig) -> str:
    loc = cfg.artifact_location
    if "://" in loc:
        return loc
    return Path(loc).resolve().as_uri()


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


def ensure_experiment(cfg: TrackingConfig) -> str | None:
    """Create (or find) the experiment with an explicit artifact location; returns its id, None if disabled."""
    if not cfg.enabled:
        return None
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(cfg.experiment, artifact_location=artifact_uri(cfg))
    except Exception:  # another process created it in between
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise
        return exp.experiment_id


class Tracker:
    """What a stage logs through. All methods are no-ops when ``active`` is False (disabled, or not rank 0)."""

    def __init__(self, run_id: str | None = None, client: Any = None):
        self.run_id = run_id
        self._client = client
        self.last_metrics: dict[str, float] = {}  # last value of every metric logged (copied onto a dvc parent)

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        flat = flatten(params, prefix)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if not self.active:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, step or 0)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) or hasattr(v, "item")
        ]
        for i in range(0, len(items), 500):
            self._client.log_batch(self.run_id, metrics=items[i : i + 500])
        self.last_metrics.update({m.key: m.value for m in items})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        p = Path(path)
        if p.is_dir():
            self._client.log_artifacts(self.run_id, str(p), artifact_path)
        elif p.is_file():
            self._client.log_artifact(self.run_id, str(p), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        if not self.active:
            return
        self._client.log_dict(self.run_id, obj, name)

    def log_figure(self, fig: Any, name: str) -> None:
        if not self.active:
            return
        self._client.log_figure(self.run_id, fig, name)


def _params_dict(params: Section | Mapping[str, Any] | None) -> dict[str, Any]:
    if params is None:
        return {}
    if isinstance(params, Section):
        return params.model_dump()
    return dict(params)


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Section | Mapping[str, Any] | None = None,
    cfg: TrackingConfig | None = None,
    *,
    rank: int | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[Tracker]:
    """One MLflow run for one stage (child of ``$SLOTCON_PARENT_RUN_ID`` when set), logged by rank 0 only.

    Yields a :class:`Tracker`; the run ends FINISHED on success and FAILED if the block raises.
    """
    from components import dist

    cfg = cfg or TrackingConfig()
    rank = dist.get_rank() if rank is None else rank
    if not cfg.enabled or rank != 0:
        yield Tracker()
        return
    import mlflow

    exp_id = ensure_experiment(cfg)
    client = mlflow.MlflowClient(tracking_uri(cfg))
    all_tags = {
        "slotcon.stage": stage,
        "mlflow.runName": stage,
        "git.commit": git_commit(),
        "dvc.lock.md5": dvc_lock_hash(),
    }
    parent = os.environ.get(PARENT_ENV)
    implicit_parent = None if parent else _dvc_pipeline_parent(client, exp_id)
    parent = parent or implicit_parent
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    if os.environ.get(FLOW_RUN_ENV):
        all_tags["prefect.flow_run_id"] = os.environ[FLOW_RUN_ENV]
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    run = client.create_run(exp_id, tags=all_tags, run_name=stage)
    tracker = Tracker(run.info.run_id, client)
    tracker.log_params(_params_dict(params), prefix=f"{stage}.")
    try:
        yield tracker
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        if implicit_parent:
            _close_dvc_parent(client, implicit_parent, stage, tracker, "FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
    if implicit_parent:
        _close_dvc_parent(client, implicit_parent, stage, tracker, "FINISHED")


def dvc_invocation() -> tuple[str, str] | None:
    """``(key, "dvc repro ...")`` of the ``dvc repro``/``dvc exp run`` process among this process's ancestors.

    The key (host, pid, start time) is unique per DVC invocation, so every stage of one ``dvc repro`` finds the same
    parent run. None when not launched by DVC (or psutil can't tell).
    """
    import socket

    try:
        import psutil

        proc = psutil.Process().parent()
        while proc is not None and proc.pid > 1:
            cmd = proc.cmdline()
            names = [Path(c).name for c in cmd[:3]]
            if "dvc" in names:
                i = names.index("dvc")
                if set(cmd[i + 1 : i + 3]) & {"repro", "exp", "experiments"}:
                    key = f"{socket.gethostname()}:{proc.pid}:{int(proc.create_time())}"
                    return key, " ".join(["dvc", *cmd[i + 1 :]])
            proc = proc.parent()
    except Exception:  # no psutil, a vanished process, no permission: no implicit parent
        return None
    return None


def _dvc_pipeline_parent(client: Any, exp_id: str) -> str | None:
    """The parent run of the DVC invocation that launched this stage (created by its first stage), or None."""
    inv = dvc_invocation()
    if inv is None:
        return None
    key, desc = inv
    found = client.search_runs([exp_id], filter_string=f"tags.`slotcon.dvc_invocation` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {
        "slotcon.pipeline": "1",
        "slotcon.dvc_invocation": key,
        "mlflow.source.name": desc,
        "git.commit": git_commit(),
        "dvc.lock.md5": dvc_lock_hash(),
    }
    run = client.create_run(exp_id, tags=tags, run_name=desc)
    try:  # the whole params.yaml on the parent, so two pipeline runs compare side by side in the UI
        import yaml

        params = yaml.safe_load(Path("params.yaml").read_text())
        if isinstance(params, Mapping):
            Tracker(run.info.run_id, client).log_params(params)
    except Exception:
        pass
    return run.info.run_id


def _close_dvc_parent(client: Any, parent: str, stage: str, tracker: Tracker, status: str) -> None:
    """Copy the stage's final metrics onto the DVC invocation's parent run and end it (until the next stage)."""
    Tracker(parent, client).log_metrics({f"{stage}.{k}": v for k, v in tracker.last_metrics.items()})
    client.set_tag(parent, "dvc.lock.md5.final", dvc_lock_hash())
    client.set_terminated(parent, status=status)


def log_json_artifact(tracker: Tracker, obj: Any, name: str) -> None:
    """Small helper for metric files: write ``obj`` to a temp JSON and log it under ``name``."""
    if not tracker.active:
        return
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_text(json.dumps(obj, indent=2, sort_keys=True))
        tracker.log_artifact(p)
