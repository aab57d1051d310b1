"""The MLflow parent run of one pipeline run (a Prefect flow run): open it, hand its id to the stages, close it.

One pipeline run = one parent run (tag ``slotcon.pipeline=1``) in the ``tracking.experiment`` experiment; every stage's
:func:`components.tracking.stage_run` becomes its child because the flow exports ``SLOTCON_PARENT_RUN_ID`` (and
``SLOTCON_FLOW_RUN_ID``) to the stage subprocesses. The parent carries what a user compares side by side in the UI:
the whole (overridden) ``params.yaml`` as params, and at the end the final metrics of every stage, flattened and
prefixed by the stage (``detect.bbox_ap``), copied from the stages' DVC metrics files.

Relative store paths (``sqlite:///mlflow.db``, ``mlartifacts``) are resolved against the repository root here, and the
absolute URI is exported to the stages, so the flow process and the stages write to the same store whatever the
flow's working directory is.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from components import tracking
from components.config import TrackingConfig


def resolve_store(cfg: TrackingConfig, root: str | os.PathLike) -> TrackingConfig:
    """``cfg`` with its SQLite URI and artifact location made absolute relative to ``root`` (the DVC repo)."""
    root = Path(root).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{root / uri[len('sqlite:///'):]}"
    loc = cfg.artifact_location
    if "://" not in loc and not Path(loc).is_absolute():
        loc = str(root / loc)
    return cfg.model_copy(update={"tracking_uri": uri, "artifact_location": loc})


def _client(cfg: TrackingConfig):
    import mlflow

    return mlflow.MlflowClient(cfg.tracking_uri)


def open_parent_run(
    cfg: TrackingConfig,
    root: str | os.PathLike,
    *,
    run_name: str,
    flow_run_id: str | None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str | None:
    """Create the experiment if needed (before any stage: SQLite migration races otherwise), open the parent run.

    ``cfg`` must come from :func:`resolve_store`. Returns the run id, or None when tracking is disabled.
    """
    if not cfg.enabled:
        return None
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # tracking.ensure_experiment reads MLFLOW_TRACKING_URI first: make it agree with cfg for this call
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking_uri
    try:
        exp_id = tracking.ensure_experiment(cfg)
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    root = Path(root)
    all_tags = {
        "slotcon.pipeline": "1",
        "mlflow.runName": run_name,
        "git.commit": tracking.git_commit(cwd=root),
        "dvc.lock.md5": tracking.dvc_lock_hash(root / "dvc.lock"),
        "mlflow.source.name": "pipelines/flow.py:slotcon_pipeline",
    }
    if flow_run_id:
        all_tags["prefect.flow_run_id"] = flow_run_id
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    client = _client(cfg)
    run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
    if params:
        tracking.Tracker(run.info.run_id, client).log_params(params)
    return run.info.run_id


def read_metrics_files(root: str | os.PathLike, stage_metrics: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """``{stage: [metrics files]}`` -> flat ``{"<stage>.<key>": number}`` of every file that exists and parses."""
    out: dict[str, float] = {}
    for stage, files in stage_metrics.items():
        for rel in files:
            p = Path(root) / rel
            if not p.is_file():
                continue
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(data, Mapping):
                continue
            for k, v in tracking.flatten(data, f"{stage.split(':')[-1]}.").items():
                if isinstance(v, bool):
                    v = int(v)
                if isinstance(v, (int, float)):
                    out[k] = float(v)
    return out


def close_parent_run(
    cfg: TrackingConfig,
    run_id: str | None,
    root: str | os.PathLike,
    *,
    metrics: Mapping[str, float],
    failed: bool,
    tags: Mapping[str, Any] | None = None,
) -> None:
    """Copy the final stage metrics onto the parent, tag the final ``dvc.lock`` hash, end it FINISHED or FAILED."""
    if run_id is None:
        return
    client = _client(cfg)
    tracker = tracking.Tracker(run_id, client)
    tracker.log_metrics(dict(metrics))
    final_tags = {"dvc.lock.md5.final": tracking.dvc_lock_hash(Path(root) / "dvc.lock")}
    final_tags.update(tags or {})
    tracker.set_tags(final_tags)
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED", end_time=int(time.time() * 1000))


def run_tree(cfg: TrackingConfig, parent_id: str, metric_keys: int = 4) -> str:
    """A text picture of the parent and its children (status, duration, a few metrics), for the demo's closing note."""
    client = _client(cfg)
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )

    def line(run, indent: str) -> str:
        info = run.info
        secs = ((info.end_time or info.start_time) - info.start_time) / 1000 if info.start_time else 0
        keys = sorted(run.data.metrics)[:metric_keys]
        shown = ", ".join(f"{k}={run.data.metrics[k]:.4g}" for k in keys)
        more = f" (+{len(run.data.metrics) - len(keys)} more)" if len(run.data.metrics) > len(keys) else ""
        return f"{indent}{info.run_name}  [{info.status}, {secs:.1f}s, run {info.run_id[:8]}]  {shown}{more}".rstrip()

    lines = [line(parent, "")]
    for i, child in enumerate(children):
        lines.append(line(child, "└─ " if i == len(children) - 1 else "├─ "))
    return "\n".join(lines)
