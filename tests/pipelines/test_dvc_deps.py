"""``dvc.yaml``'s code deps are each stage's import closure: the repo's file agrees, ``slotcon deps`` repairs a
missing entry, and editing a module a stage imports makes real ``dvc status`` report that stage (and not others)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components import dvcdeps

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def _copy_repo(dst: Path) -> Path:
    shutil.copytree(REPO / "components", dst / "components", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy2(REPO / name, dst / name)
    return dst


def test_repo_dvc_yaml_lists_every_module_each_stage_imports():
    assert dvcdeps.differences(REPO / "dvc.yaml") == {}, "run `slotcon deps` to rewrite dvc.yaml's code deps"


def test_every_slotcon_stage_of_dvc_yaml_is_covered():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert set(dvcdeps.stage_modules(spec)) == set(spec["stages"])


def test_the_pretrain_closure_holds_the_loader_and_every_method():
    deps = dvcdeps.code_deps("components.pretrain.stage", REPO)
    covered = lambda f: any(f == d or f.startswith(d + "/") for d in deps)  # noqa: E731
    for f in ("components/data/loading/reading.py", "components/data/loading/ledger.py", "components/stage.py",
              "components/config.py", "components/dist.py", "components/pretrain/methods/sim/model.py",
              "components/pretrain/methods/mocov2/model.py", "components/pretrain/methods/slotcon/model.py"):
        assert covered(f) or covered(f.replace("config.py", "config/__init__.py")), f
    # the scene generator is not something pretraining runs
    assert not covered("components/data/scenes/draw.py")


def test_deps_check_names_a_missing_module_and_deps_writes_it_back(tmp_path):
    root = _copy_repo(tmp_path)
    text = (root / "dvc.yaml").read_text()
    spec = yaml.safe_load(text)
    others = {d for name, s in spec["stages"].items() if name != "pretrain" for d in s.get("deps", [])}
    victim = next(d for d in spec["stages"]["pretrain"]["deps"] if d.startswith("components/") and d not in others)
    (root / "dvc.yaml").write_text(text.replace(f"      - {victim}\n", "", 1))
    run = lambda *a: subprocess.run([sys.executable, "-m", "components", "deps", *a], cwd=root, env=_env(),  # noqa: E731
                                    capture_output=True, text=True)
    bad = run("--check")
    assert bad.returncode == 1
    assert "stage pretrain: missing" in bad.stderr and victim in bad.stderr and "run `slotcon deps`" in bad.stderr
    fixed = run()
    assert fixed.returncode == 0, fixed.stderr
    assert dvcdeps.differences(root / "dvc.yaml") == {}
    assert "# resumable checkpoints live in checkpoints/pretrain" in (root / "dvc.yaml").read_text()  # comments kept


def _placeholders(root: Path, stage: dict) -> None:
    """Stand-ins for a stage's data deps and outputs, so ``dvc commit`` can record it without running it."""
    entries = [d for d in stage.get("deps", []) if not d.startswith("components/")]
    for key in ("outs", "metrics", "plots"):
        entries += [next(iter(o)) if isinstance(o, dict) else o for o in stage.get(key, [])]
    for rel in entries:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(f"{rel}\n")


@pytest.mark.slow
def test_touching_a_module_pretrain_imports_makes_dvc_status_report_pretrain(tmp_path):
    root = _copy_repo(tmp_path)
    env = _env()
    sh = lambda *a: subprocess.run(list(a), cwd=root, env=env, capture_output=True, text=True)  # noqa: E731
    assert sh("git", "init", "-q").returncode == 0
    assert sh("dvc", "init", "-q").returncode == 0
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    for name in ("pretrain", "scenes"):
        _placeholders(root, spec["stages"][name])
        done = sh("dvc", "commit", "-f", "-q", name)
        assert done.returncode == 0, done.stderr
    clean = sh("dvc", "status", "pretrain", "scenes")
    assert "pretrain" not in clean.stdout and "scenes" not in clean.stdout, clean.stdout

    with open(root / "components" / "data" / "loading" / "reading.py", "a") as fh:
        fh.write("\n# an edit\n")
    status = sh("dvc", "status", "pretrain", "scenes")
    assert status.returncode == 0, status.stderr
    assert "pretrain:" in status.stdout and "components/data/loading" in status.stdout, status.stdout
    assert "scenes:" not in status.stdout  # the scene generator does not import the loader
