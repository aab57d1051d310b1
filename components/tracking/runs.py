"""One MLflow run per stage (:func:`stage_run`), the child of its pipeline's parent run (:mod:`.parent`), written by
rank 0 only through a :class:`~components.tracking.tracker.Tracker`; on other ranks, or with
``tracking.enabled: false``, every call does nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator, Mapping

from components.config import Section, TrackingConfig
from components.tracking import parent as pipeline_run
from components.tracking.lineage import dvc_lock_hash, git_commit
from components.tracking.repair import OWNER_TAG, owner_key, repair
from components.tracking.store import create_run, first_line, open_store, tracking_uri
from components.tracking.tracker import Tracker

PARENT_ENV = "SLOTCON_PARENT_RUN_ID"
FLOW_RUN_ENV = "SLOTCON_FLOW_RUN_ID"


def _params_dict(params: Section | Mapping[str, Any] | None) -> dict[str, Any]:
    if params is None:
        return {}
    if isinstance(params, Section):
        return params.model_dump()
    return dict(params)


def start_system_metrics(run_id: str, uri: str, interval_s: float = 5.0) -> Any:
    """MLflow's system metrics (CPU, memory, disk, network; GPU through nvidia-ml-py where present) for the run."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no INFO start/stop lines in the console
    try:
        # lazy: mlflow costs ~1 s at start-up; only training stages record system metrics
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                       tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - a missing probe must not stop training
        print(f"slotcon: warning: MLflow system metrics off ({first_line(exc)})", file=sys.stderr)
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


def _rank() -> int:
    """This process's rank; torch only if this process already uses it (a tiny script's stage need not import it)."""
    if "torch.distributed" in sys.modules:
        from components import dist  # lazy: torch loads only where this process already did

        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


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
    raises. An unusable store is a :class:`~components.tracking.store.StoreError` before the block runs; a store
    failing later never raises.
    """
    cfg = cfg or TrackingConfig()
    if rank is None:
        rank = _rank()
    if not cfg.enabled or rank != 0:
        yield Tracker()
        return
    uri = tracking_uri(cfg)
    client, exp_id = open_store(cfg)
    repair(client, exp_id, cfg.registered_model)
    all_tags = {"slotcon.stage": stage, "mlflow.runName": stage, "git.commit": git_commit(),
                "dvc.lock.md5": dvc_lock_hash(), OWNER_TAG: owner_key()}
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
