"""Where artifacts go and what a server that is not there costs: an MLflow server's proxied store is the default, a
``mlflow-artifacts:`` location is never a local folder, env overrides for experiment and location, and a server that
does not answer is one line within the project's own wait (not MLflow's ~4 minutes of HTTP retries)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from components.config import TrackingConfig
from components.tracking import StoreError, open_store
from components.tracking.store import artifact_uri, resolved


def test_a_server_uri_gets_the_servers_store_not_a_local_folder(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.lab:5000")
    monkeypatch.delenv("SLOTCON_ARTIFACT_LOCATION", raising=False)
    assert artifact_uri(TrackingConfig()) is None  # the default "mlartifacts": the server decides
    assert artifact_uri(TrackingConfig(artifact_location="s3://bucket/x")) == "s3://bucket/x"
    for given in ("mlflow-artifacts:/team", "mlflow-artifacts:///team"):
        assert artifact_uri(TrackingConfig(artifact_location=given)) == "mlflow-artifacts:/team"
    monkeypatch.setenv("SLOTCON_ARTIFACT_LOCATION", "mlflow-artifacts:/other")
    assert artifact_uri(TrackingConfig()) == "mlflow-artifacts:/other"


def test_local_store_keeps_its_folder_and_env_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("SLOTCON_EXPERIMENT", "from-env")
    monkeypatch.setenv("SLOTCON_ARTIFACT_LOCATION", str(tmp_path / "art"))
    cfg = resolved(TrackingConfig())
    assert cfg.experiment == "from-env" and artifact_uri(cfg) == (tmp_path / "art").as_uri()


def test_mlflow_artifacts_with_a_local_store_is_one_line(mlflow_store, tmp_path, monkeypatch):
    """It used to pass and become a local folder named ``mlflow-artifacts%3A``."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError) as err:
        open_store(TrackingConfig(artifact_location="mlflow-artifacts:/x"))
    assert "needs an MLflow server" in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.glob("mlflow-artifacts*"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.faults
def test_server_down_at_start_is_one_line_within_the_wait(tmp_path):
    """SLOTCON_TRACKING_WAIT_S bounds the whole wait (MLflow's own retries used to take 4 min 8 s)."""
    uri = f"http://127.0.0.1:{_closed_port()}"
    code = ("from components.config import TrackingConfig\nfrom components.tracking import stage_run\n"
            "with stage_run('scenes', {}, TrackingConfig(), rank=0):\n    print('WORK RAN')\n")
    env = {"MLFLOW_TRACKING_URI": uri, "SLOTCON_TRACKING_WAIT_S": "4"}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", "import sys\nfrom components.errors import UserError\ntry:\n"
                          + "".join("    " + ln + "\n" for ln in code.splitlines())
                          + "except UserError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n"],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    took = time.monotonic() - t0
    assert out.returncode == 2 and "WORK RAN" not in out.stdout, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and uri in lines[0] and "did not answer" in lines[0], out.stderr
    assert took < 40, took
