"""prefect.yaml's deployments on the stack's Prefect server: registered in its process pool with code pulled by
``git clone`` (no pinned checkout) and their schedules, and the stack's worker runs a flow run of one of them."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from components.stack.services import POOL, api, workers_online
from components.stack.settings import StackSettings

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[2]


def _settings(stack) -> StackSettings:
    return StackSettings(dir=stack.dir, env_file=stack.env_file, repo=REPO, ports=dict(stack.ports))


@pytest.fixture(scope="module")
def deployed(stack) -> dict[str, dict]:
    env = {**os.environ, **stack.env, "PREFECT_HOME": str(stack.root / "prefect-cli"), "SLOTCON_GIT_URL": str(REPO),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    prefect = str(Path(sys.executable).parent / "prefect")
    out = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    status, deps = api(_settings(stack), "POST", "/deployments/filter", {})
    assert status == 200, deps
    return {d["name"]: d for d in deps}


def test_deployments_register_in_the_pool_and_pull_code(stack, deployed):
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    s = _settings(stack)
    assert workers_online(s), "the stack's worker is not polling its pool"
    for d in spec["deployments"]:
        dep = deployed[d["name"]]
        assert dep["work_pool_name"] == POOL
        steps = [next(iter(step)) for step in dep["pull_steps"]]
        assert steps[0] == "prefect.deployments.steps.git_clone"
        assert dep["pull_steps"][0][steps[0]]["repository"] == str(REPO)
        assert str(REPO) not in str(dep["pull_steps"][1:]), "a pinned absolute working directory"
        status, scheds = api(s, "GET", f"/deployments/{dep['id']}/schedules")
        assert status == 200 and [x["schedule"]["cron"] for x in scheds] == [x["cron"] for x in d["schedules"]]


@pytest.mark.slow
def test_the_stacks_worker_runs_a_deployment_in_a_fresh_clone(stack, deployed):
    """A flow run of ``nightly`` (one stage): the worker clones the code, runs it, MLflow on the stack records it."""
    from mlflow import MlflowClient

    s = _settings(stack)
    status, run = api(s, "POST", f"/deployments/{deployed['nightly']['id']}/create_flow_run",
                      {"parameters": {"targets": ["scenes"], "force": False, "retries": 0}})
    assert status in (200, 201), run
    deadline, state = time.monotonic() + 420, None
    while time.monotonic() < deadline:
        state = api(s, "GET", f"/flow_runs/{run['id']}")[1]["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(3)
    assert state and state["type"] == "COMPLETED", state
    client = MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("slotcon-pipeline")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{run['id']}'")
    assert any(r.data.tags.get("slotcon.stage") == "scenes" for r in runs), [r.data.tags for r in runs]
