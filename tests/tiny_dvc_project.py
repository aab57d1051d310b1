"""A tiny, real DVC project for the flow and tracking tests: git + dvc init, four python stages a -> b -> d, a -> c.

The stages are small python scripts that open a real ``components.tracking.runs.stage_run`` and write DVC metrics, so the
flow, DVC and MLflow all run for real; only the ML work is left out. Stage X fails while the file ``FAIL_X`` exists;
``attempts/X`` counts how often X really ran.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

VENV_BIN = Path(sys.executable).parent


def venv_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


STAGE_PY = textwrap.dedent(
    """
    import json, pathlib, sys
    from components.config import load_section
    from components.io import write_json_atomic
    from components.tracking.runs import stage_run

    name, inputs = sys.argv[1], sys.argv[2:]
    attempts = pathlib.Path("attempts")
    attempts.mkdir(exist_ok=True)
    with open(attempts / name, "a") as f:  # counts how often the stage really ran
        f.write("x")
    cfg = load_section("scenes")
    with stage_run(name, cfg, load_section("tracking")) as tracker:
        print(f"stage {name}: reading {inputs}", flush=True)
        if pathlib.Path(f"FAIL_{name}").exists():
            print(f"boom: tiny stage {name} failed on purpose", file=sys.stderr, flush=True)
            sys.exit(3)
        total = cfg.seed + sum(len(pathlib.Path(p).read_text()) for p in inputs)
        pathlib.Path("out").mkdir(exist_ok=True)
        pathlib.Path(f"out/{name}.txt").write_text(name * (total % 5 + 1))
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        tracker.log_metrics({"value": total})
        write_json_atomic(f"metrics/{name}.json", {"value": total, "nested": {"seed": cfg.seed}})
    """
)


def _stage(name: str, inputs: list[str]) -> dict:
    return {
        "cmd": f"python stage.py {name} {' '.join(inputs)}".strip(),
        "deps": ["stage.py", *inputs],
        "params": ["scenes.seed"],
        "outs": [f"out/{name}.txt"],
        "metrics": [{f"metrics/{name}.json": {"cache": False}}],
    }


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def make_tiny_project(root: Path) -> Path:
    """A committed git + DVC repo with stages a -> b -> d, a -> c; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "stage.py").write_text(STAGE_PY)
    (root / "params.yaml").write_text(
        "tracking:\n  enabled: true\n  tracking_uri: sqlite:///mlflow.db\n  artifact_location: mlartifacts\n"
        "  experiment: tiny\n  registered_model: tiny-backbone\nscenes:\n  seed: 3\n"
    )
    dvc_yaml = {"stages": {"a": _stage("a", []), "b": _stage("b", ["out/a.txt"]),
                           "c": _stage("c", ["out/a.txt"]), "d": _stage("d", ["out/b.txt"])}}
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\nattempts/\nFAIL_*\n/metrics/\n")  # as this repo
    env = venv_env()
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "test@example.com")
    _git(root, "config", "user.name", "test")
    subprocess.run(["dvc", "init", "-q"], cwd=root, env=env, check=True)
    subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=root, env=env, check=True)
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "tiny project")
    return root
