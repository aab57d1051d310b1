"""The Prefect flow's side of the MLflow parent run: resolve the store, open the parent, hand its id on, close it.

The parent itself is written by :mod:`components.tracking.parent` (the same code a plain ``dvc repro`` uses). Every
stage's :func:`components.tracking.runs.stage_run` becomes its child because the flow exports ``SLOTCON_PARENT_RUN_ID``
(and ``SLOTCON_FLOW_RUN_ID``) to the stage subprocesses. The parent carries the whole (overridden) ``params.yaml`` as
params and, at the end, the headline metrics of every stage (``detect.bbox_AP``) read from the DVC metrics files.

Relative store paths (``sqlite:///mlflow.db``, ``mlartifacts``) are resolved against the repository root here, and the
absolute URI is exported to the stages, so the flow process and the stages write to the same store whatever the
flow's working directory is.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import mlflow

from components.tracking import parent as pipeline_run
from components import tracking
from components.config import TrackingConfig
from components.tracking.store import has_scheme


def resolve_store(cfg: TrackingConfig, root: str | os.PathLike) -> TrackingConfig:
    """``cfg`` with its SQLite URI and artifact location made absolute relative to ``root`` (the DVC repo)."""
    root = Path(root).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{root / uri[len('sqlite:///'):]}"
    loc = cfg.artifact_location
    if not has_scheme(loc) and not Path(loc).is_absolute():
        loc = str(root / loc)
    return cfg.model_copy(update={"tracking_uri": uri, "artifact_location": loc})


def mlflow_client(cfg: TrackingConfig):
    return mlflow.MlflowClient(cfg.tracking_uri)


def _store(cfg: TrackingConfig):
    """``(client, experiment id)`` through :func:`components.tracking.runs.open_store` with ``cfg``'s URI."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking_uri  # tracking_uri() reads the variable first
    try:
        return tracking.open_store(cfg)
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def open_parent_run(
    cfg: TrackingConfig,
    root: str | os.PathLike,
    *,
    run_name: str,
    flow_run_id: str | None,
    params_file: str = "params.yaml",
    tags: Mapping[str, Any] | None = None,
) -> str | None:
    """Check the store (one-line error if unusable), create the experiment before any stage (SQLite migrations race
    otherwise), open the parent run (:func:`components.tracking.parent.open_parent`). ``cfg`` must come from
    :func:`resolve_store`. Returns the run id, or None when tracking is disabled."""
    if not cfg.enabled:
        return None
    client, exp_id = _store(cfg)
    all_tags = {"mlflow.source.name": "pipelines/flow.py:slotcon_pipeline", "slotcon.driver": "prefect"}
    if flow_run_id:
        all_tags["prefect.flow_run_id"] = flow_run_id
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    return pipeline_run.open_parent(client, exp_id, root, name=run_name, tags=all_tags, params_file=params_file,
                                    uri=cfg.tracking_uri)


def read_metrics_files(root: str | os.PathLike, stage_metrics: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """``{stage: [metrics files]}`` -> flat ``{"<stage>.<key>": number}`` (the headline files DVC compares)."""
    return pipeline_run.headline_metrics(root, stage_metrics)


def close_parent_run(
    cfg: TrackingConfig,
    run_id: str | None,
    root: str | os.PathLike,
    *,
    metrics: Mapping[str, float],
    failed: bool,
    tags: Mapping[str, Any] | None = None,
) -> None:
    """Headline metrics onto the parent, ``dvc.lock`` artifact and hash, end it FINISHED or FAILED."""
    if run_id is None:
        return
    pipeline_run.close_parent(mlflow_client(cfg), run_id, root, metrics=metrics, status="FAILED" if failed else "FINISHED",
                              tags=tags, uri=cfg.tracking_uri)


def discard_noop_run(cfg: TrackingConfig, run_id: str | None) -> None:
    """A pipeline run in which no stage ran (all up to date): tag it and move it to MLflow's deleted runs, so the
    runs table lists only runs that did something (``mlflow gc`` or the UI's "deleted" filter still show it)."""
    if run_id is None:
        return
    client = mlflow_client(cfg)
    client.set_tag(run_id, "slotcon.noop", "1")
    client.delete_run(run_id)


def run_tree(cfg: TrackingConfig, parent_id: str, metric_keys: int = 4) -> str:
    """A text picture of the parent and its children (status, duration, a few metrics), for the demo's closing note."""
    client = mlflow_client(cfg)
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
