"""Crafted and outdated torch files: no code in a checkpoint ever runs, every reader refuses it in one line.

A crafted ``last.pt`` / step checkpoint / backbone / detector file whose pickle calls ``os.system`` (it would create a
marker file) is handed to each entry point that loads a file: ``slotcon export`` (CLI), unsup_seg and viz (their
``--checkpoint``), a resume from a checkpoint folder, detect's backbone and detector loads. Each must refuse it with
one line naming the file, and the marker must not exist. A checkpoint written before the RNG states were stored as
tensors (NumPy's state pickled as an ndarray) is refused the same way, with the fix. Saved checkpoints hold only
plain values, and train time adds up over resumed segments.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import UnsupConfig, VizConfig
from components.engine import checkpoint as ckpt
from components.engine.loop import Method, RunSpec, fit, find_resume_state
from components.errors import UserError
from components.pretrain.artifact import PretrainArtifact
from components.transfer.detect.maskrcnn import load_detector
from components.transfer.export import convert_checkpoint, load_backbone
from components.transfer.unsup.stage import run_unsup_seg
from components.transfer.unsup.viz import run_viz

pytestmark = pytest.mark.faults

REPO_ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this calls ``os.system`` (what a hostile file does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    """A torch file that looks like a pretrain checkpoint and runs ``touch <marker>`` when fully unpickled."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil" / "last.pt"
    path.parent.mkdir()
    torch.save({"model": {"w": torch.zeros(2)}, "arch": "resnet18", "state_dict": {}, "payload": _Payload(marker)},
               path)
    return path, marker


def _one_line(exc: BaseException, path: Path) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


def test_the_crafted_file_would_run_code_with_the_full_unpickler(crafted):
    path, marker = crafted
    torch.load(path, weights_only=False)  # the control: what every reader must never do
    assert marker.exists()


def test_export_cli_refuses_a_crafted_checkpoint_in_one_line(crafted, tmp_path):
    path, marker = crafted
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLOTCON_", "MLFLOW_TRACKING"))}
    env.update(PYTHONPATH=str(REPO_ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = subprocess.run([sys.executable, "-m", "components", "export", "--params", str(REPO_ROOT / "params.yaml"),
                          "--checkpoint", str(path), "--out", str(tmp_path / "backbone.pt")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.strip().splitlines() if str(path) in ln]
    assert len(lines) == 1 and "refusing to load" in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not marker.exists()
    assert not (tmp_path / "backbone.pt").exists()


@pytest.mark.parametrize("reader", ["artifact", "convert", "backbone", "detector"])
def test_every_loader_refuses_a_crafted_file(crafted, reader):
    path, marker = crafted
    load = {"artifact": PretrainArtifact.load, "convert": convert_checkpoint, "backbone": load_backbone,
            "detector": load_detector}[reader]
    with pytest.raises(UserError) as err:
        load(path)
    assert "refusing to load" in _one_line(err.value, path)
    assert not marker.exists()


def test_method_of_a_crafted_file_runs_nothing(crafted):
    path, marker = crafted
    assert PretrainArtifact.method_of(path) == "slotcon"  # unreadable: the loader that follows reports it
    assert not marker.exists()


def test_unsup_seg_and_viz_refuse_a_crafted_checkpoint(crafted, shards, tmp_path):
    path, marker = crafted
    with pytest.raises(UserError) as err:
        run_unsup_seg(UnsupConfig(), shards, path)
    _one_line(err.value, path)
    with pytest.raises(UserError) as err:
        run_viz(VizConfig(), shards, path, tmp_path / "viz", device="cpu")
    _one_line(err.value, path)
    assert not marker.exists()
    assert not (tmp_path / "viz").exists() or not any((tmp_path / "viz").iterdir())


def test_resume_refuses_a_crafted_file_in_the_checkpoint_folder(crafted, tmp_path):
    path, marker = crafted
    run = tmp_path / "ckpt" / "abc"
    ckpt.save_checkpoint({"model": {"w": torch.ones(2)}, "step": 1}, run, 1)
    evil = run / "step_000000002.pt"
    evil.write_bytes(path.read_bytes())
    with pytest.raises(UserError) as err:
        ckpt.find_latest(run)
    assert "refusing to load" in _one_line(err.value, evil)
    with pytest.raises(UserError):
        find_resume_state(run)
    assert not marker.exists()


def test_an_old_format_checkpoint_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "step_000000003.pt"
    torch.save({"model": {"w": torch.ones(2)}, "rank_states": [{"numpy": np.random.get_state()}]}, path)
    with pytest.raises(UserError) as err:
        ckpt.load_checkpoint(path)
    msg = _one_line(err.value, path)
    assert "delete it and re-run" in msg


class _Toy(Method):
    """Linear regression with global-RNG dropout and numpy / python draws in its batches (their RNG states are in
    every checkpoint)."""

    stat_keys = ("loss",)
    global_batch = 4

    def build(self, device):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.2), torch.nn.Linear(4, 1)).to(device)

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.05)

    def lr_at(self, step):
        return 0.05

    def batches(self, epoch):
        for _ in range(3):
            x = torch.from_numpy(np.random.randn(4, 3).astype(np.float32))
            yield {"x": x, "y": x.sum(1, keepdim=True)}

    def prepare(self, batch, device):
        return batch

    def forward(self, model, batch, step):
        return {"loss": torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])}


def _fit(ckpt_dir, stop=None):
    np.random.seed(0)
    return fit(_Toy(), RunSpec(total_steps=6, steps_per_epoch=3, log_every=1, progress=False), ckpt_dir=ckpt_dir,
               fingerprint={"x": 1}, stop_after_step=stop)


def test_checkpoints_hold_only_plain_values_and_resume_exactly(tmp_path):
    straight = _fit(tmp_path / "a")
    _fit(tmp_path / "b", stop=3)
    (run_dir,) = (tmp_path / "b").iterdir()
    newest = ckpt.list_checkpoints(run_dir)[-1][1]
    state = torch.load(newest, weights_only=True)  # no pickled object: numpy / python RNG states are plain
    assert isinstance(state["rank_states"][0]["numpy"]["keys"], torch.Tensor)
    resumed = _fit(tmp_path / "b")
    assert resumed.resumed_from is not None
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]


def test_train_time_sums_over_resumed_segments(tmp_path):
    _fit(tmp_path, stop=3)
    (run_dir,) = tmp_path.iterdir()
    first = float(torch.load(ckpt.list_checkpoints(run_dir)[-1][1], weights_only=True)["train_time_s"])
    assert first > 0
    rest = _fit(tmp_path)
    assert rest.train_time_s >= first + rest.segment_time_s - 1e-6
    again = _fit(tmp_path)  # a finished run re-run (`--force`): no step runs, the time is the run's, not 0
    assert again.steps_this_run == 0
    assert again.train_time_s >= first
