"""The project's tracking through the stack's MLflow server: stage runs, pictures and registered versions land in
PostgreSQL and the bucket with the default params (no local artifact folder), a server killed and restarted mid-run
loses nothing and never stops the loop, and what an interrupted run left is put right at the next start."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from components.config import TrackingConfig
from components.tracking import stage_run
from components.tracking.repair import COMPLETE_TAG, OWNER_TAG

pytestmark = pytest.mark.stack


def _bucket_keys(stack, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    return [o["Key"] for o in s3.list_objects_v2(Bucket="slotcon", Prefix=prefix).get("Contents", [])]


def test_stage_run_with_default_params_lands_on_the_server(stack, stack_env, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLOTCON_EXPERIMENT", "server-defaults")
    with stage_run("scenes", {"seed": 3}, TrackingConfig(), rank=0) as tracker:
        tracker.log_metrics({"loss": 1.5}, step=1)
        tracker.log_dict({"a": 1}, "info.json")
    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("server-defaults")
    assert exp.artifact_location.startswith("mlflow-artifacts:/"), exp.artifact_location
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["scenes.seed"] == "3"
    assert run.data.tags[OWNER_TAG]
    assert f"mlartifacts/{exp.experiment_id}/{run.info.run_id}/artifacts/info.json" in _bucket_keys(stack, "mlartifacts/")
    assert not (tmp_path / "mlartifacts").exists()


def _restart_mlflow_later(stack, after_s: float) -> threading.Thread:
    def go():
        time.sleep(after_s)
        stack.cli("up")  # idempotent: starts only what is down

    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th


@pytest.mark.faults
def test_server_killed_and_restarted_mid_run_loses_nothing(stack, stack_env, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("SLOTCON_EXPERIMENT", "server-kill")
    steps, slowest = 40, 0.0
    with stage_run("pretrain", {"epochs": 1}, TrackingConfig(), rank=0) as tracker:
        run_id = tracker.run_id
        for step in range(steps):
            if step == 5:
                rec = json.loads((stack.dir / "pids.json").read_text())["mlflow"]
                os.killpg(rec["pid"], signal.SIGKILL)
                restarter = _restart_mlflow_later(stack, 2.0)
            t0 = time.monotonic()
            tracker.log_metrics({"loss": float(step)}, step=step)
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.1)
        restarter.join(timeout=300)
    assert slowest < 0.5, f"a logging call blocked the loop for {slowest:.1f} s"
    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(steps))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_stale_running_runs_and_half_made_versions_are_put_right(stack, stack_env, tmp_path, monkeypatch):
    """A run whose process died stays RUNNING; a version cut off before its tags stays without them: the next stage
    start closes the first as KILLED and removes the second."""
    from mlflow import MlflowClient

    monkeypatch.setenv("SLOTCON_EXPERIMENT", "server-repair")
    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    key = f"{os.uname().nodename}:{dead.stdout.strip()}:{int(time.time()) - 5}"
    exp_id = client.create_experiment("server-repair")
    run = client.create_run(exp_id, tags={OWNER_TAG: key})
    stale, art = run.info.run_id, run.info.artifact_uri
    client.create_registered_model("slotcon-backbone-repairtest")
    whole = client.create_model_version("slotcon-backbone-repairtest", f"{art}/a", run_id=stale,
                                        tags={COMPLETE_TAG: "abc"})
    cut = client.create_model_version("slotcon-backbone-repairtest", f"{art}/b", run_id=stale)
    with stage_run("export", {}, TrackingConfig(registered_model="slotcon-backbone-repairtest"), rank=0):
        pass
    assert client.get_run(stale).info.status == "KILLED"
    versions = {v.version for v in client.search_model_versions("name = 'slotcon-backbone-repairtest'")}
    assert versions == {whole.version} and cut.version not in versions
    model = client.get_registered_model("slotcon-backbone-repairtest")
    assert model.aliases.get("candidate") == whole.version
