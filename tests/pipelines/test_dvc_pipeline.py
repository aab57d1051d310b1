"""The REAL pipeline (this repo's dvc.yaml, every stage) on the smallest params, in a temporary git copy of the repo.

1. ``python -m pipelines.flow`` (what ``make demo`` runs, ephemeral Prefect): every stage runs and writes its metrics;
   MLflow holds one parent run with a child per stage and a registered backbone version.
2. A second ``dvc repro`` does nothing.
3. ``dvc exp run -S pretrain.epochs=2 pretrain`` runs a variant; ``dvc exp show`` lists it, ``dvc metrics diff``
   compares it with the committed baseline.
4. ``dvc plots show`` renders offline: ``--json`` (the data, no HTML) and an HTML page whose pictures are local files.
Plus what a seasoned user checks: headline-only parents, no COCO −1 values, every picture a DVC output,
the experiment opens on its runs, lineage (datasets, registry alias and tags), system metrics, a params typo that
leaves the outputs in place, and workspace damage to a shard repaired from the cache.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# Smallest values that still exercise every code path (a few images, one epoch, a couple of iterations).
TINY = {
    "tracking": {"enabled": True},
    "scenes": {"num_train": 16, "num_val": 8, "image_size": 64, "workers": 1},
    "data": {"workers": 1},
    "shard": {"max_count": 8, "workers": 1},
    "pretrain": {"image_size": 64, "batch_size": 8, "epochs": 1, "num_workers": 0,
                 "log_every_steps": 1, "slotcon": {"num_prototypes": 8, "dim_hidden": 32, "dim_out": 16,
                                                   "warmup_epochs": 0}},
    "detect": {"iters": 2, "batch_size": 2, "warmup_iters": 1, "steps": [1], "min_size": [64], "max_size": 128,
               "test_size": 64, "compare_random": False, "num_vis": 1, "proposals_train": 50,
               "proposals_test": 50, "mask_head": [16, 16], "rpn_batch_size": 16, "roi_batch_size": 16,
               "detections_per_img": 10, "save_every": 1},
    "segment": {"iters": 2, "batch_size": 2, "crop_size": 64, "compare_random": False, "head_channels": 16},
    "probe": {"resolution": 64, "steps": 5, "compare_random": False, "layers": ["layer4"], "batch_size": 8},
    "unsup": {"resolution": 64, "compare_random": False, "batch_size": 8},
    "viz": {"num_images": 2, "top_prototypes": 2, "num_neighbors": 2, "resolution": 64, "batch_size": 8},
}


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "PREFECT_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false", "DO_NOT_TRACK": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "2"}
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "SLOTCON_PARENT_RUN_ID", "SLOTCON_FLOW_RUN_ID"):
        env.pop(k, None)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{text[-6000:]}"
    return text


def _json(cmd: list[str], cwd: Path, env: dict[str, str]):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}"
    return json.loads(out.stdout)


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k) or {}, v) if isinstance(v, dict) else v
    return base


def copy_repo(dst: Path) -> Path:
    """The tracked and untracked-not-ignored files of this checkout (no outputs, no venv), as a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO_ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    for git in (["init", "-q"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"]):
        subprocess.run(["git", *git], cwd=dst, check=True)
    return dst


@pytest.mark.slow
def test_real_pipeline_end_to_end(tmp_path):
    root = copy_repo(tmp_path / "repo")
    env = _env(tmp_path / "prefect_home")
    params = _merge(yaml.safe_load((root / "params.yaml").read_text()), TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["slotcon", "check"], root, env)
    for git in (["add", "-A"], ["commit", "-q", "-m", "tiny copy"]):
        subprocess.run(["git", *git], cwd=root, check=True)

    # 1. the flow, as `make demo` runs it (ephemeral Prefect)
    log = _run([sys.executable, "-m", "pipelines.flow", "--retries", "0"], root, env)
    assert "slotcon-pipeline: Completed" in log, log[-6000:]
    from pipelines.dvcgraph import load_stages

    stages = load_stages(root)
    missing = [f"{s.name}: {m}" for s in stages for m in s.metrics if not (root / m).is_file()]
    assert not missing, f"metrics not written: {missing}"
    for s in stages:
        for m in s.metrics:
            assert isinstance(json.loads((root / m).read_text()), dict)

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    (parent,) = client.search_runs([exp.experiment_id], "tags.`slotcon.pipeline` = '1'")
    assert parent.info.status == "FINISHED"
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    # every stage but `check` (a params validation, no MLflow run of its own) is a child of the one parent
    assert sorted({k.data.tags["slotcon.stage"] for k in kids}) == sorted(s.name for s in stages if s.name != "check")
    assert all(k.info.status == "FINISHED" for k in kids)
    assert any(k.startswith("pretrain.") for k in parent.data.metrics)
    versions = client.search_model_versions(f"name = '{params['tracking']['registered_model']}'")
    assert versions and versions[0].run_id in {k.info.run_id for k in kids}
    _check_issue16_records(root, client, exp, parent, kids, params, stages)

    # 2. nothing to do the second time
    again = _run(["dvc", "repro"], root, env)
    assert "Running stage" not in again and "up to date" in again, again[-3000:]

    # a params typo: a plain `dvc repro` stops at the check stage, before DVC deletes pretrain's outputs
    good = (root / "params.yaml").read_text()
    last = root / "models" / "pretrain" / "last.pt"
    stamp = last.stat().st_mtime_ns
    (root / "params.yaml").write_text(good.replace("  epochs: 1\n", "  epochs: 1\n  epochz: 2\n", 1))
    bad = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "unknown key pretrain.epochz" in bad.stdout + bad.stderr
    assert last.is_file() and last.stat().st_mtime_ns == stamp and (root / "metrics" / "pretrain.json").is_file()
    (root / "params.yaml").write_text(good)

    # 3. a DVC experiment with a params override, compared with the committed baseline
    _run(["make", "baseline"], root, env)  # what a user runs: dvc.lock + the git-tracked metrics and plots
    _run(["dvc", "exp", "run", "-n", "ep2", "-S", "pretrain.epochs=2", "pretrain"], root, env)
    assert '"ep2"' in json.dumps(_json(["dvc", "exp", "show", "--json"], root, env))
    diff = _json(["dvc", "metrics", "diff", "--json"], root, env)
    assert any("pretrain" in path for path in diff), diff
    assert (root / "params.yaml").read_text().count("epochs: 2") == 1  # dvc exp run leaves the variant applied

    # 4. plots without the internet: the data as JSON, and an HTML page whose images are local files
    # workspace damage to a shard never reaches the cache: `dvc checkout` restores shards that --verify accepts
    shard = sorted((root / "data" / "shards").rglob("*.tar"))[0]
    os.chmod(shard, 0o644)
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    _run(["dvc", "checkout", "--force", "data/shards"], root, env)
    _run(["slotcon", "shard", "--out", "data/shards", "--verify", "--no-progress"], root, env)

    plots_json = _json(["dvc", "plots", "show", "--json"], root, env)
    assert "plots/pretrain/loss.csv" in json.dumps(plots_json)
    _run(["dvc", "plots", "show", "-o", str(tmp_path / "dvc_plots")], root, env)
    html = (tmp_path / "dvc_plots" / "index.html").read_text()
    assert "<img" in html and "loss.png" in html  # pictures are local files: they render offline


def _check_issue16_records(root, client, exp, parent, kids, params, stages) -> None:
    from pipelines.mlflow_runs import read_metrics_files

    # headline only on the parent, named <stage>.<key> from the DVC metrics files (one source of truth)
    headline = read_metrics_files(root, {s.name: s.metrics for s in stages})
    assert set(parent.data.metrics) == set(headline), set(parent.data.metrics) ^ set(headline)
    assert all(parent.data.metrics[k] == v for k, v in headline.items())
    assert parent.data.metrics["pretrain.loss"] == json.loads((root / "metrics/pretrain.json").read_text())["loss"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"params.yaml", "dvc.lock"}
    # COCO's -1 ("no objects of that size") is never logged as a value
    for run in [parent, *kids]:
        assert not [k for k, v in run.data.metrics.items() if v == -1.0], run.info.run_name
    # the experiment opens on its runs, not on MLflow 3's GenAI overview
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    by_stage = {k.data.tags["slotcon.stage"]: k for k in kids}
    pre = by_stage["pretrain"]
    inputs = {(d.dataset.name, t.value) for d in pre.inputs.dataset_inputs for t in d.tags}
    assert ("shards/train2017", "training") in inputs, inputs
    assert any(k.startswith("system/cpu") for k in pre.data.metrics), sorted(pre.data.metrics)[:20]
    # the registry: a described version with @candidate, found by downstream stages through its md5 tags
    name = params["tracking"]["registered_model"]
    version = client.get_model_version_by_alias(name, "candidate")
    assert version.description and version.tags["slotcon.backbone_md5"] and "unsup_seg.mIoU" in version.tags
    # every picture a stage writes is a declared DVC output (or inside one)
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        outs = [Path(o.fs_path) for st in repo.index.stages for o in st.outs]
    pictures = list((root / "plots").rglob("*.png"))
    assert pictures
    stray = [p for p in pictures if not any(p == o or o in p.parents for o in outs)]
    assert not stray, f"pictures that DVC does not track: {stray}"
