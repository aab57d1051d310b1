"""The flow's run link: the tracking server's own UI when tracking goes to a server, else a local `mlflow server`."""
from __future__ import annotations

from types import SimpleNamespace

from pipelines import reports


def test_run_link_points_at_the_server_that_holds_the_run(monkeypatch):
    fake_run = SimpleNamespace(info=SimpleNamespace(experiment_id="7"))
    monkeypatch.setattr(reports.mlflow_runs, "mlflow_client",
                        lambda tcfg: SimpleNamespace(get_run=lambda run_id: fake_run))
    monkeypatch.delenv("SLOTCON_MLFLOW_UI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:15000")
    assert reports.mlflow_run_url(None, "abc").startswith("http://10.0.0.5:15000/#/experiments/7/runs/abc")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    local = SimpleNamespace(tracking_uri="sqlite:///mlflow.db")
    assert reports.mlflow_run_url(local, "abc").startswith("http://127.0.0.1:5000/#/experiments/7/runs/abc")
    monkeypatch.setenv("SLOTCON_MLFLOW_UI", "https://ui.lab/")
    assert reports.mlflow_run_url(local, "abc").startswith("https://ui.lab/#/experiments/7")
    assert reports.mlflow_run_url(local, None) is None
