"""The method comparison: statistics on fixed numbers (hand-computed and against scipy), the cells' params, the
report, and (slow) the whole flow on a tiny grid."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from components import compare as cmp


# --------------------------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------------------------
def test_describe_mean_std_and_t_interval_by_hand():
    d = cmp.describe([1.0, 2.0, 3.0])
    assert d["n"] == 3 and d["mean"] == pytest.approx(2.0) and d["std"] == pytest.approx(1.0)  # n - 1 in the std
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, df=2) from a table
    assert d["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    one = cmp.describe([0.5])
    assert one["mean"] == 0.5 and one["std"] is None and one["ci95"] == [None, None]
    assert cmp.describe([float("nan"), None, 1.0])["n"] == 1  # non-finite and missing values are not replicates
    assert cmp.describe([])["mean"] is None


def test_welch_by_hand_and_against_scipy():
    from scipy import stats

    t = cmp.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    # diff -3, se = sqrt(1/3 + 1/3), t = -3.674, df = 4 (equal variances and sizes)
    assert t["diff"] == pytest.approx(-3.0) and t["df"] == pytest.approx(4.0)
    assert t["p"] == pytest.approx(2 * stats.t.sf(3.0 / math.sqrt(2 / 3), 4)) and t["significant"]
    half = 2.7764451051977987 * math.sqrt(2 / 3)  # t(0.975, 4)
    assert t["ci95"] == pytest.approx([-3.0 - half, -3.0 + half])
    a, b = [0.41, 0.38, 0.45, 0.40], [0.36, 0.39, 0.33]
    ref = stats.ttest_ind(a, b, equal_var=False)
    w = cmp.welch(a, b)
    assert w["p"] == pytest.approx(ref.pvalue, rel=1e-9) and w["significant"] == (ref.pvalue < 0.05)
    assert not cmp.welch([0.1, 0.2, 0.3], [0.15, 0.25, 0.2])["significant"]
    assert cmp.welch([1.0], [2.0, 3.0])["p"] is None  # a single replicate: no test
    same = cmp.welch([0.5, 0.5], [0.7, 0.7])  # no variance at all: the means differ or they don't
    assert same["significant"] and same["p"] == 0.0


def test_summarize_collect_and_table():
    cells = {
        ("random", 0): {"probe": {"dense_mIoU": 0.30, "object_acc": 0.20}, "detect": {"bbox_AP": -1.0}},
        ("random", 1): {"probe": {"dense_mIoU": 0.32, "object_acc": 0.22}, "detect": {"bbox_AP": 0.01}},
        ("slotcon", 0): {"probe": {"dense_mIoU": 0.40, "object_acc": 0.30}},
        ("slotcon", 1): {"probe": {"dense_mIoU": 0.42, "object_acc": 0.31}},
        ("slotcon", 2): {"probe": {"dense_mIoU": 0.41, "object_acc": "n/a"}},
    }
    values = cmp.collect(cells)
    assert values["random"]["probe/dense_mIoU"] == [0.30, 0.32]
    assert values["random"]["detect/bbox_AP"] == [0.01]  # COCOeval's -1 ("no such objects") is not a value
    assert values["slotcon"]["probe/object_acc"] == [0.30, 0.31]
    metrics = ["probe/dense_mIoU", "probe/object_acc", "detect/bbox_AP"]
    s = cmp.summarize(values, ["random", "slotcon"], metrics)
    assert s["methods"]["slotcon"]["probe/dense_mIoU"]["mean"] == pytest.approx(0.41)
    assert s["methods"]["slotcon"]["detect/bbox_AP"]["n"] == 0
    test = s["tests"]["probe/dense_mIoU"]["random vs slotcon"]
    assert test["diff"] == pytest.approx(0.31 - 0.41) and test["significant"]
    md = cmp.markdown_table(s, ["random", "slotcon"], metrics)
    assert md.splitlines()[0] == "| metric | random | slotcon |"
    assert "| dense probe mIoU | 0.310 ± 0.014" in md and "| Mask R-CNN AP^b | 0.010 (n=1) | – |" in md
    assert "dense probe mIoU: random vs slotcon -0.100" in md and "2 comparisons" in md
    json.dumps(s, allow_nan=False)


def test_plot_is_a_png(tmp_path):
    s = cmp.summarize({"a": {"m/x": [1.0, 2.0]}, "b": {"m/x": [2.0, 2.5, 3.0]}}, ["a", "b"], ["m/x"])
    cmp.write_plot(s, ["a", "b"], ["m/x"], tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------------------------------------
def test_cell_params_set_method_seeds_and_overrides_without_touching_the_base():
    base = {"pretrain": {"method": "slotcon", "epochs": 3, "slotcon": {"arch": "resnet18"}}, "probe": {"seed": 0}}
    ov = cmp.parse_overrides(["pretrain.epochs=10", "pretrain.mocov2.queue_size=64", "detect.steps=[2, 3]",
                              "export.register_model=false"])
    assert ov == {"pretrain.epochs": 10, "pretrain.mocov2.queue_size": 64, "detect.steps": [2, 3],
                  "export.register_model": False}
    p = cmp.cell_params(base, ov, "mocov2", 2)
    assert p["pretrain"]["method"] == "mocov2" and p["pretrain"]["epochs"] == 10
    assert p["pretrain"]["mocov2"] == {"queue_size": 64} and p["detect"]["steps"] == [2, 3]
    assert all(p[k.split(".")[0]][k.split(".")[1]] == 2 for k in cmp.SEED_KEYS)
    assert base["pretrain"] == {"method": "slotcon", "epochs": 3, "slotcon": {"arch": "resnet18"}}
    r = cmp.cell_params(base, {}, "random", 1)
    assert r["pretrain"]["method"] == "slotcon" and r["pretrain"]["seed"] == 1  # random: no pretraining method
    assert cmp.digest(p) != cmp.digest(cmp.cell_params(base, ov, "mocov2", 1))
    with pytest.raises(ValueError, match="section.key=value"):
        cmp.parse_overrides(["epochs=3"])


def test_default_overrides_are_valid_params():
    """The comparison's defaults on top of the repository's params.yaml pass every section's validation."""
    import yaml

    from components.config import SECTIONS, parse_section

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    for method in ("random", "mocov2", "slotcon"):
        p = cmp.cell_params(base, cmp.DEFAULT_OVERRIDES, method, 1)
        for section in SECTIONS:
            parse_section(section, p.get(section))


def test_random_init_is_a_seeded_torchvision_trunk(tmp_path):
    import torch
    import torchvision

    from components.transfer.export import convert_checkpoint

    a = cmp.write_random_init(tmp_path / "a", arch="resnet18", seed=3)
    b = cmp.write_random_init(tmp_path / "b", arch="resnet18", seed=3)
    c = cmp.write_random_init(tmp_path / "c", arch="resnet18", seed=4)
    arch, sd, source = convert_checkpoint(a)
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    net.load_state_dict(sd, strict=True)
    assert arch == "resnet18" and source["method"] == "mocov2"
    assert torch.equal(sd["conv1.weight"], convert_checkpoint(b)[1]["conv1.weight"])
    assert not torch.equal(sd["conv1.weight"], convert_checkpoint(c)[1]["conv1.weight"])


# --------------------------------------------------------------------------------------------------------------------
# the flow on a tiny grid
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect_home")
    old = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_API_URL")}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.pop("PREFECT_API_URL", None)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=240):  # its first start migrates a SQLite DB; slow when busy
        yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


TINY_GRID = {
    "scenes.num_train": 32, "scenes.num_val": 8, "scenes.image_size": 64, "scenes.min_object_frac": 0.2,
    "pretrain.image_size": 64, "pretrain.batch_size": 16, "pretrain.epochs": 1, "pretrain.slotcon.warmup_epochs": 0,
    "pretrain.num_workers": 0, "pretrain.samples_per_epoch": 16,
    "pretrain.mocov2.queue_size": 16, "pretrain.mocov2.dim_hidden": 32, "pretrain.mocov2.dim": 16,
    "probe.resolution": 64, "probe.steps": 5, "probe.layers": ["layer4"], "unsup.resolution": 64,
}


@pytest.mark.slow
def test_compare_flow_on_a_tiny_grid(prefect_server, tmp_path, monkeypatch, repo_root):
    """random + mocov2 x 2 seeds through pretrain/export/probe: files, MLflow tree, skip on re-run."""
    import mlflow
    import yaml

    from pipelines.compare import slotcon_compare

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLOTCON_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PYTHONPATH", str(repo_root))
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["tracking"]["artifact_location"] = str(tmp_path / "artifacts")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    kw = dict(methods=["random", "mocov2"], seeds=[0, 1], stages=["probe"], params_overrides=TINY_GRID,
              repo_dir=str(tmp_path))
    res = slotcon_compare(**kw)
    out = json.loads((tmp_path / "metrics" / "compare.json").read_text())
    assert out["complete"] and out["grid"] == {"methods": ["random", "mocov2"], "seeds": [0, 1], "stages": ["probe"]}
    for m in ("random", "mocov2"):
        d = out["methods"][m]["probe/dense_mIoU"]
        assert d["n"] == 2 and 0 <= d["mean"] <= 1 and d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert "random vs mocov2" in out["tests"]["probe/object_acc"]
    assert (tmp_path / "plots" / "compare.png").stat().st_size > 0
    assert "| dense probe mIoU |" in (tmp_path / "metrics" / "compare.md").read_text()
    cell = tmp_path / "runs" / "compare" / "cells" / "mocov2-s1"
    assert yaml.safe_load((cell / "params.yaml").read_text())["pretrain"]["seed"] == 1

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("slotcon-pipeline").experiment_id], max_results=200)
    parent = next(r for r in runs if r.info.run_id == res["parent_run_id"])
    assert parent.info.status == "FINISHED" and "mocov2.probe.dense_mIoU.mean" in parent.data.metrics
    cells = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
             and "slotcon.compare.method" in r.data.tags]
    assert len(cells) == 4
    mo = next(r for r in cells if r.data.tags["slotcon.compare.method"] == "mocov2")
    stages = {r.data.tags.get("slotcon.stage") for r in runs if r.data.tags.get("mlflow.parentRunId") == mo.info.run_id}
    assert {"pretrain", "export", "probe"} <= stages

    # a second run finds every stage done (stamps of the same params) and only re-aggregates
    again = slotcon_compare(**kw)
    assert again["seconds"] < res["seconds"] and again["summary"] == res["summary"]


def test_stage_commands_write_only_inside_the_cell(tmp_path):
    """Every output path option of a cell's stage commands is given (none falls back to a default under the
    repository's models/, plots/, metrics/ or checkpoints/), and points inside the cell."""
    import importlib

    from components.cli import STAGES as CLI
    from pipelines.compare import stage_command

    cell, data = tmp_path / "cells" / "slotcon-s0", tmp_path / "data"
    for stage in ("pretrain", "export", *cmp.STAGES):
        cmd = stage_command(stage, cell, data)
        spec = importlib.import_module(CLI[stage][0]).STAGE
        for arg in spec.all_args():
            default = str(arg.default or "")
            if arg.flag or not default.startswith(("models/", "plots/", "metrics/", "checkpoints/")):
                continue
            assert arg.option in cmd, f"{stage}: {arg.option} left at its default {default}"
            assert cmd[cmd.index(arg.option) + 1].startswith(str(cell)), (stage, arg.option)
