"""What a flow run leaves for people: Prefect markdown artifacts (per-stage metrics, the run summary, a failure
record), the MLflow UI link of the parent run, and the headline figures printed by ``make demo``."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run as current_flow_run

from pipelines import mlflow_runs


def flow_run_info() -> tuple[str | None, str]:
    """(id, name) of the Prefect flow run this code runs in; ``(None, "local")`` outside one."""
    fid = current_flow_run.get_id()
    return (str(fid) if fid else None), (current_flow_run.get_name() or "local")


def metrics_markdown(stage: str, status: str, seconds: float, metrics: Mapping[str, float]) -> str:
    rows = "\n".join(f"| `{k}` | {v:.6g} |" for k, v in sorted(metrics.items()))
    body = f"| metric | value |\n|---|---|\n{rows}" if metrics else "_no metrics file declared or written_"
    return f"### DVC stage `{stage}`: {status} in {seconds:.1f} s\n\n{body}\n"


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def mlflow_run_url(tcfg: Any, run_id: str | None) -> str | None:
    """The parent run's page in the MLflow UI: ``$SLOTCON_MLFLOW_UI``, else the tracking server itself when the URI is
    an http(s) server (it serves the UI), else http://127.0.0.1:5000 (`mlflow server` on the local store)."""
    if not run_id:
        return None
    uri = os.environ.get("MLFLOW_TRACKING_URI") or getattr(tcfg, "tracking_uri", "")
    default = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    base = os.environ.get("SLOTCON_MLFLOW_UI", default).rstrip("/")
    try:
        exp_id = mlflow_runs.mlflow_client(tcfg).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a link is a convenience
        return None
    # workflowType: MLflow 3's UI otherwise opens its GenAI side (a per-browser choice, not the experiment's kind tag)
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning"


def summary_markdown(results: Mapping[str, Any], seconds: float, headline: Mapping[str, float], url: str | None,
                     parent_id: str | None, exp_name: str | None, noop: bool) -> str:
    table = "\n".join(f"| `{n}` | {r['status']} | {r.get('seconds', '')} |" for n, r in results.items())
    figures = "\n".join(f"| `{k}` | {v:.4g} |" for k, v in headline.items())
    if noop:
        mlflow_line = "Nothing ran (every stage up to date): no MLflow run kept."
    elif url:
        mlflow_line = f"MLflow parent run: [{parent_id}]({url})"
    else:
        mlflow_line = f"MLflow parent run: `{parent_id}`" if parent_id else "MLflow: tracking disabled"
    return (f"## slotcon-pipeline in {seconds:.1f} s\n\n| stage | status | seconds |\n|---|---|---|\n{table}\n\n"
            + (f"### Headline metrics\n\n| metric | value |\n|---|---|\n{figures}\n\n" if figures else "")
            + mlflow_line + (f"; DVC experiment: `{exp_name}`" if exp_name else "") + "\n")


def record_failure(flow, flow_run, state) -> None:
    """Flow hook (on_failure, on_crashed): a clear failure record a person or a script finds without the UI: a line
    in ``<repo>/.slotcon/failures.jsonl`` (time, flow run, state, message) and a ``slotcon-pipeline-failure``
    markdown artifact. Notifications (mail, Slack) are a Prefect automation: README "When a run fails"."""
    params = getattr(flow_run, "parameters", None) or {}
    root = Path(params.get("repo_dir") or os.getcwd())
    message = (state.message or "").strip()
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "flow_run": str(flow_run.id), "flow_run_name": flow_run.name, "state": state.name,
              "deployment_id": str(flow_run.deployment_id) if flow_run.deployment_id else None,
              "message": message[:2000]}
    try:
        out = root / ".slotcon" / "failures.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    except OSError:
        pass
    with contextlib.suppress(Exception):
        create_markdown_artifact(
            markdown=f"## slotcon-pipeline {state.name}: `{flow_run.name}`\n\n```\n{message[-3000:]}\n```\n",
            key="slotcon-pipeline-failure", description="why this pipeline run failed")


def print_metrics(headline: Mapping[str, float]) -> None:
    """The headline metrics, one per line (``dvc metrics show`` prints the same figures, one wide row per file)."""
    print("\nheadline metrics (dvc metrics show; every figure: metrics/details/*.json):")
    for k, v in headline.items():
        print(f"  {k:<32} {v:.6g}")
