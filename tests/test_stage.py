"""The stage runtime: one torchrun self-launch, headline/detail metrics, stale outputs removed, side commands."""
from __future__ import annotations

import argparse
import json

import pytest

from components.config import PretrainConfig
from components.errors import UserError
from components.stage import Arg, Stage, launch_command, run_stage, split_metrics, under_torchrun


def _stage(run, **kw):
    return Stage(name="toy", section="viz", run=run, metrics="metrics/toy.json", track=False,
                 args=(Arg("out", "o", "a path"), Arg("fast", False, "a switch", flag=True)), **kw)


def test_launch_command_reproduces_the_arguments():
    st = _stage(lambda ctx: {})
    args = argparse.Namespace(params="p.yaml", out="x y", fast=True, metrics="m.json", details=None)
    cfg = PretrainConfig(nproc_per_node=2, batch_size=4)
    cmd = launch_command(st, args, cfg, env={})
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    assert cmd[5:] == ["-m", "components", "toy", "--params", "p.yaml", "--out", "x y", "--fast",
                       "--metrics", "m.json"]
    two_nodes = PretrainConfig(nproc_per_node=2, nnodes=2, batch_size=4)
    with pytest.raises(UserError, match="MASTER_ADDR"):
        launch_command(st, args, two_nodes, env={})
    cmd = launch_command(st, args, two_nodes, env={"MASTER_ADDR": "n0", "NODE_RANK": "1"})
    assert "--nnodes=2" in cmd and "--node_rank=1" in cmd and "--master_port=29500" in cmd
    # node 0 under DVC is the normal recipe; another node under DVC is told the command to run instead
    assert "--node_rank=0" in launch_command(st, args, two_nodes, env={"MASTER_ADDR": "n0", "NODE_RANK": "0",
                                                                        "DVC_STAGE": "toy"})
    with pytest.raises(UserError) as err:
        launch_command(st, args, two_nodes, env={"MASTER_ADDR": "n0", "NODE_RANK": "1", "DVC_STAGE": "toy"})
    msg = str(err.value)
    assert "\n" not in msg and "only node 0 runs `dvc repro toy`" in msg
    assert msg.endswith("slotcon toy --params p.yaml --out x y --fast --metrics m.json")


def test_under_torchrun_never_launches_twice():
    assert not under_torchrun({})
    assert under_torchrun({"TORCHELASTIC_RUN_ID": "x"}) and under_torchrun({"LOCAL_RANK": "0"})
    assert under_torchrun({"WORLD_SIZE": "2"}) and not under_torchrun({"WORLD_SIZE": "1"})


def test_headline_and_details_and_stale_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("viz: {}\ntracking: {enabled: false}\n")
    metrics, details = tmp_path / "m.json", tmp_path / "d.json"
    st = _stage(lambda ctx: {"mIoU": 0.5, "per_class": {"a": 1.0}, "time": 3}, headline=("mIoU", "time"))
    args = argparse.Namespace(params="params.yaml", out="o", fast=False, metrics=str(metrics), details=str(details))
    assert run_stage(st, args) == 0
    assert json.loads(metrics.read_text()) == {"mIoU": 0.5, "time": 3}
    assert json.loads(details.read_text())["per_class"] == {"a": 1.0}
    assert split_metrics({"a": 1, "b": 2}, ()) == {"a": 1, "b": 2}

    def boom(ctx):
        raise UserError("bad input")

    with pytest.raises(UserError):
        run_stage(_stage(boom), args)
    assert not metrics.exists() and not details.exists()  # a failed run leaves no figures that look like its own


def test_side_command_runs_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("viz: {}\ntracking: {enabled: false}\n")
    (tmp_path / "m.json").write_text("{}")
    seen = []
    st = _stage(lambda ctx: seen.append("run"), aside=("fast", lambda cfg, args: seen.append("aside")))
    args = argparse.Namespace(params="params.yaml", out="o", fast=True, metrics="m.json", details=None)
    assert run_stage(st, args) == 0
    assert seen == ["aside"] and (tmp_path / "m.json").exists()  # the side command touches no metrics
