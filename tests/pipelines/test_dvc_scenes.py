"""``dvc repro scenes`` in a temporary git+DVC copy of the repo: runs the stage (after the params check stage), logs
to MLflow, then is a no-op; a params typo then stops ``dvc repro`` before DVC deletes the stage's outputs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

TINY_PARAMS = """\
tracking:
  enabled: true
  artifact_location: {artifacts}
scenes:
  seed: 1
  num_train: 4
  num_val: 2
  image_size: 48
"""


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_dvc_repro_scenes_then_nothing_to_reproduce(tmp_path, repo_root):
    venv_bin = Path(sys.executable).parent
    dvc = venv_bin / "dvc"
    if not dvc.exists():
        pytest.fail(f"{dvc} not found: install the project (make setup) so the venv has dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(repo_root / "components", repo / "components", ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".dvcignore", ".gitignore"):
        if (repo_root / name).exists():
            shutil.copy2(repo_root / name, repo / name)
    # the repo's own `check` and `scenes` stages (the other stages' deps don't exist in this copy; check's params
    # narrowed to the sections this copy has)
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    check = {**stages["check"], "params": ["tracking", "scenes"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"check": check, "scenes": stages["scenes"]}},
                                                  sort_keys=False))
    (repo / "params.yaml").write_text(TINY_PARAMS.format(artifacts=tmp_path / "artifacts"))
    db = tmp_path / "mlflow.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLOTCON_", "MLFLOW_", "GIT_"))}
    env.update(
        PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(repo),  # the copy's components/, not the editable install's
        MLFLOW_TRACKING_URI=f"sqlite:///{db}",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
    )
    _run(["git", "init", "-q"], repo, env)
    _run([str(dvc), "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "init"], repo, env)

    first = _run([str(dvc), "repro", "scenes"], repo, env)
    out = repo / "data" / "scenes"
    for rel in ("annotations/instances_train2017.json", "annotations/instances_val2017.json",
                "annotations/semantic_classes.json"):
        assert (out / rel).is_file(), first.stdout
    assert len(list((out / "train2017").glob("*.jpg"))) == 4
    assert len(list((out / "stuffthingmaps_trainval2017" / "val2017").glob("*.png"))) == 2
    assert (repo / "metrics" / "scenes.json").is_file() and (repo / "dvc.lock").is_file()
    # headline in the DVC metrics file, every figure in the details file (a DVC out)
    assert set(yaml.safe_load((repo / "metrics" / "scenes.json").read_text())) == {"train.images", "val.images"}
    details = yaml.safe_load((repo / "metrics" / "details" / "scenes.json").read_text())
    assert {"train.images", "train.annotations", "bytes"} <= set(details)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    second = _run([str(dvc), "repro", "scenes"], repo, env)
    text = second.stdout + second.stderr
    assert "didn't change" in text or "up to date" in text, text
    assert "Running stage" not in text, text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp

    # the stage logged its params and dataset statistics to MLflow
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("slotcon-pipeline")
    # one stage run (a `dvc repro` may also open a pipeline parent run around it: not counted here)
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("slotcon.stage") == "scenes"]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["slotcon.stage"] == "scenes"
    assert run.data.params["scenes.num_train"] == "4" and run.data.params["scenes.seed"] == "1"
    assert run.data.metrics["train.images"] == 4 and run.data.metrics["val.images"] == 2
    assert {a.path for a in client.list_artifacts(run.info.run_id, "scenes")} >= {"scenes/preview.png",
                                                                                  "scenes/classes.json"}

    # a params typo: `dvc repro` stops at the check stage, before DVC deletes data/scenes or the metrics
    (repo / "params.yaml").write_text(TINY_PARAMS.format(artifacts=tmp_path / "artifacts") + "  num_trian: 5\n")
    bad = subprocess.run([str(dvc), "repro", "scenes"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "unknown key scenes.num_trian" in bad.stdout + bad.stderr
    assert "Running stage 'scenes'" not in bad.stdout + bad.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp
    assert (repo / "metrics" / "scenes.json").is_file()
