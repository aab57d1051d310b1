"""Subprocesses of the flows (``dvc repro``, ``slotcon <stage>``): this venv first on PATH, output streamed line by
line into the Prefect run log."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

VENV_BIN = Path(sys.executable).parent


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message holds the command, the exit status and the output's tail."""


def stage_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every DVC call: venv first on PATH, offline switches, unbuffered output, calm tqdm."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        {
            "DVC_NO_ANALYTICS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",  # lines reach the Prefect log as they are printed
            "TQDM_MININTERVAL": env.get("TQDM_MININTERVAL", "10"),  # a pipe turns every \r refresh into a log line
        }
    )
    env.update(extra or {})
    return env


def run_streamed(cmd: Sequence[str], *, cwd: str | os.PathLike, env: Mapping[str, str], logger) -> tuple[int, list[str]]:
    """Run ``cmd``; every output line (stdout+stderr) goes to ``logger.info`` as it comes. Returns (rc, all lines)."""
    logger.info("$ %s", " ".join(cmd))
    lines: list[str] = []
    proc = subprocess.Popen(
        list(cmd), cwd=str(cwd), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        errors="replace", bufsize=1,
    )
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:  # universal newlines: tqdm's \r refreshes become separate lines
            line = raw.rstrip()
            if line:
                lines.append(line)
                logger.info("%s", line)
    finally:
        rc = proc.wait()
    return rc, lines
