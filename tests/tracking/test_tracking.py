"""components.tracking against a real temporary SQLite MLflow store, read back with MlflowClient."""
from __future__ import annotations

import json
import subprocess

import pytest

from components.config import ScenesConfig, TrackingConfig
from components.tracking import FLOW_RUN_ENV, PARENT_ENV, flatten, stage_run


def _client():
    import os

    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _runs(client, cfg: TrackingConfig, filter_string: str = ""):
    exp = client.get_experiment_by_name(cfg.experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], filter_string)


def test_stage_run_writes_params_metrics_tags(mlflow_store, tmp_path):
    cfg = ScenesConfig(num_train=7)
    with stage_run("scenes", cfg, mlflow_store, rank=0, tags={"extra": 1}) as tracker:
        assert tracker.active
        for step in range(4):
            tracker.log_metrics({"loss": 4.0 - step, "nested": {"acc": 0.25 * step}}, step=step)
        tracker.log_dict({"a": 1}, "info.json")
    client = _client()
    (run,) = _runs(client, mlflow_store)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "scenes"
    assert run.data.params["scenes.num_train"] == "7"
    assert run.data.params["scenes.seed"] == "0"
    assert run.data.tags["slotcon.stage"] == "scenes" and run.data.tags["extra"] == "1"
    assert run.data.tags["git.commit"] and run.data.tags["dvc.lock.md5"]
    assert "mlflow.parentRunId" not in run.data.tags
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [4.0, 3.0, 2.0, 1.0]
    assert run.data.metrics["nested.acc"] == 0.75
    exp = client.get_experiment_by_name(mlflow_store.experiment)
    assert exp.artifact_location == (tmp_path / "artifacts").resolve().as_uri()
    assert json.loads((tmp_path / "artifacts" / run.info.run_id / "artifacts" / "info.json").read_text()) == {"a": 1}


def test_a_stage_shorter_than_one_sampling_interval_still_has_system_metrics(mlflow_store):
    """MLflow's monitor publishes after a whole interval (5 s); a short stage used to end with none (the real pipeline
    test failed on an idle machine, where the tiny pretraining took under 5 s)."""
    with stage_run("pretrain", ScenesConfig(), mlflow_store, rank=0, system_metrics=True) as tracker:
        tracker.log_metrics({"loss": 1.0})
    (run,) = _runs(_client(), mlflow_store)
    assert any(k.startswith("system/cpu") for k in run.data.metrics), sorted(run.data.metrics)


def test_stage_run_failure_marks_run_failed(mlflow_store):
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run("shard", {"x": 1}, mlflow_store, rank=0):
            raise RuntimeError("boom")
    (run,) = _runs(_client(), mlflow_store)
    assert run.info.status == "FAILED" and run.data.params["shard.x"] == "1"


@pytest.mark.parametrize("how", ["disabled", "rank1"])
def test_disabled_or_nonzero_rank_writes_nothing(mlflow_store, tmp_path, how):
    cfg = mlflow_store.model_copy(update={"enabled": False}) if how == "disabled" else mlflow_store
    with stage_run("pretrain", {"x": 1}, cfg, rank=0 if how == "disabled" else 1) as tracker:
        assert not tracker.active
        tracker.log_metrics({"loss": 1.0})
        tracker.log_params({"y": 2})
        tracker.set_tags({"t": 1})
    assert not (tmp_path / "mlflow.db").exists()  # not even the store was created
    assert not (tmp_path / "artifacts").exists()


def test_parent_child_linkage(mlflow_store, tmp_path, monkeypatch):
    from pipelines import mlflow_runs

    cfg = mlflow_runs.resolve_store(mlflow_store, tmp_path)
    (tmp_path / "params.yaml").write_text("pretrain:\n  epochs: 2\n")
    parent = mlflow_runs.open_parent_run(cfg, tmp_path, run_name="pipeline t", flow_run_id="flow-123")
    monkeypatch.setenv(PARENT_ENV, parent)
    monkeypatch.setenv(FLOW_RUN_ENV, "flow-123")
    for stage in ("pretrain", "export"):
        with stage_run(stage, {"k": stage}, mlflow_store, rank=0) as tracker:
            tracker.log_metrics({"loss": 0.5})
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "export.json").write_text(json.dumps({"ap": {"bbox": 0.5}, "name": "x", "ok": True,
                                                                  "bbox_APl": -1.0, "nan": float("nan")}))
    final = mlflow_runs.read_metrics_files(tmp_path, {"export": ["metrics/export.json", "metrics/missing.json"]})
    assert final == {"export.ap.bbox": 0.5, "export.ok": 1.0}  # no strings, no COCO -1 sentinel, no NaN
    mlflow_runs.close_parent_run(cfg, parent, tmp_path, metrics=final, failed=False)

    client = _client()
    p = client.get_run(parent)
    assert p.info.status == "FINISHED" and p.data.tags["slotcon.pipeline"] == "1"
    assert p.data.tags["prefect.flow_run_id"] == "flow-123" and p.data.params["pretrain.epochs"] == "2"
    assert p.data.metrics == {"export.ap.bbox": 0.5, "export.ok": 1.0}
    arts = {a.path for a in client.list_artifacts(parent)}
    assert "params.yaml" in arts  # dvc.lock too when there is one (none in this folder)
    children = _runs(client, mlflow_store, f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(c.data.tags["slotcon.stage"] for c in children) == ["export", "pretrain"]
    assert {c.data.tags["prefect.flow_run_id"] for c in children} == {"flow-123"}
    tree = mlflow_runs.run_tree(cfg, parent)
    assert tree.splitlines()[0].startswith("pipeline t") and "export" in tree and "pretrain" in tree


def test_resolve_store_makes_paths_absolute(tmp_path, monkeypatch):
    from pipelines.mlflow_runs import resolve_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = resolve_store(TrackingConfig(), tmp_path)
    assert cfg.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert cfg.artifact_location == str(tmp_path.resolve() / "mlartifacts")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": 1, "a.c": "[1, 2]", "d": "x"}


@pytest.mark.slow
def test_plain_dvc_repro_groups_stages_under_one_parent(tmp_path, monkeypatch, make_tiny_project, venv_env):
    """No flow: the stages of one `dvc repro` share a parent run found through the dvc process."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_ENV, raising=False)
    root = make_tiny_project(tmp_path / "tiny")
    # two invocations -> two parents: `dvc repro b` runs a and b, then `dvc repro c` runs c only (a is up to date)
    subprocess.run(["dvc", "repro", "b"], cwd=root, env=venv_env(), check=True, capture_output=True)
    subprocess.run(["dvc", "repro", "c"], cwd=root, env=venv_env(), check=True, capture_output=True)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    parents = client.search_runs([exp.experiment_id], "tags.`slotcon.pipeline` = '1'",
                                 order_by=["attributes.start_time ASC"])
    assert len(parents) == 2
    first, second = parents
    assert first.info.status == "FINISHED" and first.data.tags["mlflow.source.name"] == "dvc repro b"
    assert first.data.metrics["b.value"] == json.loads((root / "metrics/b.json").read_text())["value"]
    assert first.data.params["scenes.seed"] == "3"
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{first.info.run_id}'")
    assert sorted(k.data.tags["slotcon.stage"] for k in kids) == ["a", "b"]
    kids2 = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{second.info.run_id}'")
    assert [k.data.tags["slotcon.stage"] for k in kids2] == ["c"]


def test_promotion_decision_compares_with_the_champion():
    from pipelines.registry import decide

    assert decide({"detect.bbox_AP": "0.3"}, None, None)[0] is True
    ok, why, used = decide({"detect.bbox_AP": "0.3"}, {"detect.bbox_AP": "0.4"}, None)
    assert not ok and used == "detect.bbox_AP" and "< champion's 0.4" in why
    assert decide({"segment.mIoU": "0.5"}, {"segment.mIoU": "0.4", "detect.bbox_AP": "1"}, None)[:1] == (True,)
    assert decide({"unsup_seg.mIoU": "0.5"}, {"detect.bbox_AP": "0.4"}, None)[0] is False  # nothing in common


def test_numeric_items_drop_sentinels_strings_and_nan():
    from components.tracking import is_sentinel, numeric_items

    assert is_sentinel("pretrained/bbox_APl", -1.0) and is_sentinel("segm_ARs", -1.0)
    assert not is_sentinel("gain/loss", -1.0) and not is_sentinel("bbox_APl", 0.0)
    assert numeric_items({"a": {"bbox_APm": -1.0, "x": 2}, "s": "txt", "n": float("nan"), "ok": True}) == {
        "a.x": 2.0, "ok": 1.0}


def test_split_metrics_keeps_headline_and_nesting():
    from components.stage import split_metrics

    m = {"loss": 1.0, "train.images": 4, "splits": {"val": {"n": 2}}, "x": 3}
    assert split_metrics(m, ("loss", "train.images", "splits.val.n", "missing")) == {
        "loss": 1.0, "train.images": 4, "splits": {"val": {"n": 2}}}
    assert split_metrics(m, ()) == m


def test_every_stage_declares_a_headline(repo_root):
    """Headline keys are what DVC compares and what every parent run shows: a stage with a metrics file names them."""
    import importlib

    from components.cli import STAGES

    missing = []
    for name, (module, _) in STAGES.items():
        spec = getattr(importlib.import_module(module), "STAGE", None)
        if spec is not None and spec.metrics is not None and not spec.headline:
            missing.append(name)
    assert not missing, f"stages with a metrics file but no headline: {missing}"
