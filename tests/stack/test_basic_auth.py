"""MLflow's basic-auth app in front of a server: a stage run by a user without credentials, or with READ only, stops at
its start with one line naming the server and what is needed (401: credentials; 403: EDIT on the experiment)."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from components.config import TrackingConfig
from components.stack import procs
from components.tracking import StoreError, open_store

pytestmark = [pytest.mark.stack, pytest.mark.slow]

ADMIN_PW = "admin-password-1234"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("auth")
    (d / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{d / 'auth.db'}\n"
                                f"admin_username = admin\nadmin_password = {ADMIN_PW}\n"
                                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = _port()
    argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth", "--backend-store-uri",
            f"sqlite:///{d / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    rec = procs.start("mlflow-auth", argv, d / "server.log", env={"MLFLOW_AUTH_CONFIG_PATH": str(d / "auth.ini"),
                                                                "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key"})
    try:
        procs.wait_until("mlflow basic-auth", lambda: procs.http_ok(f"http://127.0.0.1:{port}/health"), rec, 180)
        yield f"http://127.0.0.1:{port}"
    finally:
        procs.stop(rec)


def test_no_credentials_and_read_only_are_one_line_naming_the_permission(auth_server, monkeypatch):
    from mlflow.server import get_app_client

    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server)
    monkeypatch.setenv("SLOTCON_TRACKING_WAIT_S", "5")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PW)
    open_store(TrackingConfig(experiment="shared"))  # the admin creates and tags the experiment
    get_app_client("basic-auth", tracking_uri=auth_server).create_user("reader", "reader-password-1234")

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(StoreError) as err:
        open_store(TrackingConfig(experiment="shared"))
    assert "401" in str(err.value) and "MLFLOW_TRACKING_USERNAME" in str(err.value) and auth_server in str(err.value)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "reader-password-1234")
    with pytest.raises(StoreError) as err:
        open_store(TrackingConfig(experiment="shared"))
    line = str(err.value)
    assert "403" in line and "EDIT on experiment 'shared'" in line and "\n" not in line, line
