"""A schedule fires on its own: a deployment with an interval schedule is registered on the stack's Prefect server,
the server's scheduler creates its flow run (nobody triggers one), the stack's worker runs it to COMPLETED, and its
log line is readable through the API. The stack runs with a short scheduler loop and worker poll (conftest)."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import psutil
import pytest

from components.errors import UserError
from components.stack.services import POOL, api
from components.stack.settings import INTERVALS, StackSettings, add_arguments, from_args

pytestmark = pytest.mark.stack

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WAIT_S = 90
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
LINE = "tick from the stack's worker"  # what tick_flow.py logs


def _settings(stack) -> StackSettings:
    return StackSettings(dir=stack.dir, env_file=stack.env_file, repo=REPO, ports=dict(stack.ports))


def _ok(status: int, body):
    assert status in (200, 201, 204), (status, body)
    return body


def _deploy(s: StackSettings, lead_s: float) -> dict:
    """tick_flow.py's flow as a deployment in the stack's pool, every 60 s from ``lead_s`` seconds from now (one run
    falls in the test's wait); its code is this folder, where the worker (on this machine) runs it."""
    flow = _ok(*api(s, "POST", "/flows/", {"name": "slotcon-stack-tick"}))
    anchor = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=lead_s)
    return _ok(*api(s, "POST", "/deployments/", {
        "name": "schedule-check", "flow_id": flow["id"], "work_pool_name": POOL, "work_queue_name": "default",
        "entrypoint": "tick_flow.py:tick", "path": str(HERE), "parameters": {},
        "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(HERE)}}],
        "schedules": [{"schedule": {"interval": 60, "anchor_date": anchor.isoformat()}, "active": True}]}))


def _runs(s: StackSettings, dep_id: str) -> list[dict]:
    return _ok(*api(s, "POST", "/flow_runs/filter",
                    {"flow_runs": {"deployment_id": {"any_": [dep_id]}}, "sort": "EXPECTED_START_TIME_ASC"}))


def _held(runs: list[dict]) -> str:
    return "; ".join(f"{r['name']} auto_scheduled={r['auto_scheduled']} {r['state_type']}/{r['state_name']} "
                     f"expected {r['expected_start_time']}" for r in runs) or "no flow run at all"


def _wait_final(s: StackSettings, dep_id: str, until: float) -> dict | None:
    while time.monotonic() < until:
        runs = _runs(s, dep_id)
        if runs and runs[0]["state_type"] in FINAL:
            return runs[0]
        time.sleep(1)
    return None


def _wait_log(s: StackSettings, run_id: str, until: float) -> list[str]:
    """The run's log messages once the flow's own line is in (the run's process sends its last batch as it exits,
    after the state is COMPLETED), or what there is by ``until``."""
    while True:
        logs = _ok(*api(s, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}}))
        messages = [entry["message"] for entry in logs]
        if any(LINE in m for m in messages) or time.monotonic() > until:
            return messages
        time.sleep(1)


def _when(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def test_an_interval_schedule_fires_and_the_worker_completes_its_run(stack):
    s = _settings(stack)
    t0 = time.monotonic()
    dep = _deploy(s, lead_s=8)
    try:
        run = _wait_final(s, dep["id"], t0 + WAIT_S)
        worker_log = stack.dir / "logs" / "worker.log"
        assert run is not None, (f"no run of the scheduled deployment reached a final state within {WAIT_S} s; "
                                 f"the server held: {_held(_runs(s, dep['id']))}; see {worker_log}")
        assert run["auto_scheduled"], f"a flow run the scheduler did not make: {_held([run])}"
        states = _ok(*api(s, "GET", f"/flow_run_states/?flow_run_id={run['id']}"))
        states.sort(key=lambda st: st["timestamp"])
        assert (states[0]["type"], states[0]["name"]) == ("SCHEDULED", "Scheduled"), [st["name"] for st in states]
        assert run["state_type"] == "COMPLETED", f"{_held([run])}: {run['state']['message']}; see {worker_log}"
        took = (_when(run["end_time"]) - _when(dep["created"])).total_seconds()
        print(f"\nschedule: deployment created -> auto-scheduled run COMPLETED in {took:.1f} s "
              f"(states {' -> '.join(st['name'] for st in states)})", file=sys.stderr)
        messages = _wait_log(s, run["id"], time.monotonic() + 30)
        assert any(LINE in m for m in messages), messages
    finally:
        api(s, "POST", f"/deployments/{dep['id']}/pause_deployment")  # drops the runs it still had scheduled
        api(s, "DELETE", f"/deployments/{dep['id']}")
    assert api(s, "GET", f"/deployments/{dep['id']}")[0] == 404


def test_the_stack_hands_its_intervals_to_the_server_and_the_worker(stack):
    records = json.loads((stack.dir / "pids.json").read_text())
    server = psutil.Process(records["prefect"]["pid"]).environ()
    worker = psutil.Process(records["worker"]["pid"]).environ()
    assert server["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] == "2"
    assert worker["PREFECT_WORKER_QUERY_SECONDS"] == "2"


def _parse(argv: list[str]) -> StackSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv), repo=REPO)


def test_intervals_default_to_prefects_own_and_a_bad_one_is_one_line(monkeypatch):
    for name in INTERVALS:
        monkeypatch.delenv(f"SLOTCON_STACK_{name.upper()}_S", raising=False)
    s = _parse([])
    assert s.intervals == {} and s.interval_env("scheduler_loop") == {} and s.interval_env("worker_poll") == {}
    monkeypatch.setenv("SLOTCON_STACK_SCHEDULER_LOOP_S", "5")
    s = _parse(["--worker-poll-s", "3"])
    assert s.interval_env("scheduler_loop") == {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    assert s.interval_env("worker_poll") == {"PREFECT_WORKER_QUERY_SECONDS": "3"}
    monkeypatch.setenv("SLOTCON_STACK_SCHEDULER_LOOP_S", "soon")
    with pytest.raises(UserError, match=r"'soon' is not a number of seconds \(--scheduler-loop-s"):
        _parse([])
    monkeypatch.delenv("SLOTCON_STACK_SCHEDULER_LOOP_S")
    with pytest.raises(UserError, match=r"0 s is outside 0.5-86400 s \(--worker-poll-s"):
        _parse(["--worker-poll-s", "0"])
