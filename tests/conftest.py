"""Shared fixtures for the fast CPU tier: offline switches, tiny configs, a temporary MLflow store, repo root, and
(through the plugins in tests/fixtures/) the generated data and projects several test folders use."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_UI_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

# Prefect binds its console log handler to the sys.stderr of its first import: import it now, under pytest's
# session-long capture, not inside a test's capsys (whose stream is closed after that test; later flow runs would
# then log into a closed file)
import pipelines.flow  # noqa: E402,F401

REPO_ROOT = Path(__file__).resolve().parents[1]

# tests/ is on sys.path as this conftest's folder (pytest's default "prepend" import mode)
pytest_plugins = ["fixtures.images", "fixtures.coco", "fixtures.trees", "fixtures.pretraining", "fixtures.dvc_project"]


def pytest_collection_modifyitems(config, items):
    import torch

    # Tests that run a Prefect flow in this process go last: after an in-process flow run, every fork()ed child
    # (DataLoader workers of the loader tests) exits with status 1 through Prefect's at-fork/exit hooks. The product
    # never forks after a flow run (the flow runs stages as `dvc repro` subprocesses), so only test order is at stake.
    items.sort(key=lambda item: "prefect_server" in getattr(item, "fixturenames", ()))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _few_threads():
    """2-core CI: keep each test on few intra-op threads so parallel work (workers, DDP ranks) doesn't thrash."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store in a temp dir; MLFLOW_TRACKING_URI points at it for the test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("SLOTCON_PARENT_RUN_ID", raising=False)
    from components.config import TrackingConfig

    return TrackingConfig(artifact_location=str(tmp_path / "artifacts"))
