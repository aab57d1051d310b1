"""``slotcon stack up | status``: every server answers, the env file says where, a second ``up`` starts nothing, and
MLflow's metadata lands in PostgreSQL and its artifacts in the bucket (clients hold no S3 keys)."""
from __future__ import annotations

import json
import subprocess
import sys

import psycopg2
import pytest

from components.stack import procs
from components.stack.services import SERVICES

pytestmark = pytest.mark.stack


def test_up_starts_every_server_and_writes_the_env_file(stack):
    env = stack.env
    assert env["MLFLOW_TRACKING_URI"] == stack.url("mlflow")
    assert env["PREFECT_API_URL"] == stack.url("prefect") + "/api"
    assert env["AWS_ENDPOINT_URL_S3"] == stack.url("s3") and env["SLOTCON_DVC_REMOTE"].startswith("s3://")
    assert oct(stack.env_file.stat().st_mode & 0o777) == "0o600"  # it holds the S3 secret
    assert procs.http_ok(stack.url("mlflow") + "/health") and procs.http_ok(stack.url("prefect") + "/api/health")
    out = stack.cli("status")
    assert out.stdout.count("running (pid") == len(SERVICES), out.stdout
    for line in out.stdout.splitlines():
        if "postgres" in line or "mlflow" in line:
            assert "127.0.0.1" in line  # bound to loopback unless asked


def test_up_again_starts_nothing(stack):
    before = json.loads((stack.dir / "pids.json").read_text())
    out = stack.cli("up")
    assert out.stdout.count("already running") == len(SERVICES), out.stdout
    after = json.loads((stack.dir / "pids.json").read_text())
    assert {k: v["pid"] for k, v in before.items()} == {k: v["pid"] for k, v in after.items()}


def test_port_taken_by_another_process_is_one_line(stack, tmp_path):
    """A second stack in another folder on the same ports is refused before it starts anything."""
    args = [sys.executable, "-m", "components", "stack", "up", "--dir", str(tmp_path / "other"), "--no-dvc",
            "--env-file", str(tmp_path / "other.env"), *[f"--{k}-port={v}" for k, v in stack.ports.items()]]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and f"port {stack.ports['pg']}" in err[0] and "--pg-port" in err[0], out.stderr
    assert not (tmp_path / "other.env").exists()


def test_mlflow_runs_land_in_postgres_and_artifacts_in_the_bucket(stack, stack_env, tmp_path, monkeypatch):
    import boto3
    import mlflow

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # a client needs no S3 keys: the server proxies
        monkeypatch.delenv(k)
    client = mlflow.MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    exp = client.create_experiment("stack-cli-check")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "loss", 0.5)
    (tmp_path / "pic.txt").write_text("a picture")
    client.log_artifact(run.info.run_id, str(tmp_path / "pic.txt"))
    client.set_terminated(run.info.run_id)
    with psycopg2.connect(host="127.0.0.1", port=stack.ports["pg"], user="postgres", dbname="mlflow") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
            assert cur.fetchone() == ("FINISHED",)
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="slotcon").get("Contents", [])]
    assert f"mlartifacts/{exp}/{run.info.run_id}/artifacts/pic.txt" in keys, keys
