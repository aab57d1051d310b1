"""The stack's bucket as a DVC remote: ``slotcon stack up`` writes it into ``.dvc/config.local`` (the committed config
stays laptop-usable); ``dvc push`` from one clone, ``dvc pull`` in a fresh clone, and there ``dvc status`` is clean and
``dvc repro`` runs nothing (dvc.lock and the ``cache: false`` headline metrics are committed, as ``make baseline``
does)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from components.stack.cli import configure_dvc
from components.stack.settings import StackSettings

pytestmark = pytest.mark.stack

DVC_YAML = """stages:
  make:
    cmd: python gen.py
    deps: [gen.py]
    outs: [data/out.txt]
    metrics:
      - metrics/make.json:
          cache: false
"""
GEN = """import json, os
os.makedirs("data", exist_ok=True); os.makedirs("metrics", exist_ok=True)
open("data/out.txt", "w").write("x" * 5000)
json.dump({"score": 0.5}, open("metrics/make.json", "w"))
with open("runs.log", "a") as f: f.write("ran\\n")
"""


def _sh(cwd, *cmd: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    out = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def _settings(stack, repo) -> StackSettings:
    return StackSettings(dir=stack.dir, env_file=stack.env_file, repo=repo, ports=dict(stack.ports))


def test_push_from_one_clone_pull_into_a_fresh_one_and_repro_is_a_no_op(stack, tmp_path):
    dvc = [sys.executable, "-m", "dvc"]
    one = tmp_path / "one"
    one.mkdir()
    (one / "dvc.yaml").write_text(DVC_YAML)
    (one / "gen.py").write_text(GEN)
    (one / ".gitignore").write_text("runs.log\n")
    _sh(one, "git", "init", "-q")
    _sh(one, *dvc, "init", "-q")
    _sh(one, *dvc, "repro")
    _sh(one, "git", "add", "-A")
    _sh(one, "git", "commit", "-qm", "pipeline and its lock")
    said = configure_dvc(_settings(stack, one))
    assert "config.local" in said
    assert "stack" not in (one / ".dvc" / "config").read_text()  # the committed config is untouched
    assert _sh(one, "git", "status", "--porcelain").strip() == ""  # config.local is not tracked
    _sh(one, *dvc, "push")

    two = tmp_path / "two"
    _sh(tmp_path, "git", "clone", "-q", str(one), str(two))
    configure_dvc(_settings(stack, two))
    _sh(two, *dvc, "pull")
    assert (two / "data" / "out.txt").read_text() == "x" * 5000
    assert "up to date" in _sh(two, *dvc, "status")
    _sh(two, *dvc, "repro")
    assert not (two / "runs.log").exists(), "dvc repro re-ran the stage in the pulled clone"
