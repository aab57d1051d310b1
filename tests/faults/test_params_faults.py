"""Params that can only be mistakes, params files that are not UTF-8, cross-field rules ``slotcon check`` must share
with the stages, and a disk that fills up under the atomic writers.

Each is one line naming the file (the params file given with ``--params``, the folder being written) and the fix,
before any work; a full disk leaves no half-written file behind.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from components.config import ConfigError, load_all, parse_section, read_params
from components.engine import checkpoint as ckpt
from components.errors import UserError
from components.io import write_bytes_atomic, write_json_atomic

pytestmark = pytest.mark.faults

REPO_ROOT = Path(__file__).resolve().parents[2]


def _params_with(tmp_path: Path, section: str, **values) -> Path:
    """The repository's params.yaml with ``values`` set in ``section`` (dotted keys reach subsections), as
    ``other.yaml`` in ``tmp_path`` (no dvc.yaml beside it: every section is checked)."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for key, value in values.items():
        node = params[section]
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.parametrize("section,key,value", [
    ("pretrain", "image_size", 8192),
    ("pretrain", "epochs", 10**26),
    ("pretrain", "seed", 10**26),
    ("pretrain", "seed", -1),
    ("pretrain", "batch_size", 10**9),
    ("scenes", "seed", 2**32),
    ("detect", "iters", 10**12),
    ("segment", "crop_size", 100_000),
    ("probe", "resolution", 10_000),
])
def test_values_that_can_only_be_mistakes_are_one_line(tmp_path, section, key, value):
    path = _params_with(tmp_path, section, **{key: value})
    with pytest.raises(ConfigError) as err:
        load_all(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and f"{section}.{key}" in msg


def test_a_latin1_params_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "other.yaml"
    text = (REPO_ROOT / "params.yaml").read_text() + "# caf\u00e9\n"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        read_params(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "UTF-8" in msg


def test_labeled_true_names_the_value_given():
    with pytest.raises(ConfigError) as err:
        parse_section("segment", {"labeled": True}, "other.yaml")
    msg = str(err.value)
    assert "<missing>" not in msg and "segment.labeled=True" in msg and msg.startswith("other.yaml: ")


@pytest.mark.parametrize("mocov2,batch", [({"queue_size": 100}, 32), ({"bn_splits": 3}, 32)])
def test_check_runs_the_stages_cross_field_rules(tmp_path, mocov2, batch):
    """What the MoCo v2 stage refuses, `slotcon check` refuses: `dvc repro` stops at the check stage, before DVC
    deletes the pretrain outputs."""
    path = _params_with(tmp_path, "pretrain", method="mocov2", batch_size=batch,
                        **{f"mocov2__{k}": v for k, v in mocov2.items()})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTCON_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    out = subprocess.run([sys.executable, "-m", "components", "check", "--params", str(path)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    (key, value), = mocov2.items()
    assert len(lines) == 1 and str(path) in lines[0] and f"pretrain.mocov2.{key}={value}" in lines[0], out.stderr


# --------------------------------------------------------------------------------------------------------------------
# a full disk under the atomic writers
# --------------------------------------------------------------------------------------------------------------------
class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written (what the kernel does on a full disk:
    the bytes that fit are written, then the error)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, b) -> int:
        n = min(len(b), max(self.room, 0))
        if n:
            self.f.write(bytes(memoryview(b)[:n]))
            self.room -= n
        if n < len(b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


@pytest.fixture
def full_disk(monkeypatch):
    """Every file the atomic writers open fills up after 100 bytes."""
    import components.io as cio

    real = os.fdopen
    monkeypatch.setattr(cio.os, "fdopen", lambda fd, mode="r", *a, **k: _FullDisk(real(fd, mode, *a, **k), 100))


def _assert_disk_full(err: pytest.ExceptionInfo, folder: Path) -> None:
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{folder}: no space left") and "bytes" in msg, msg
    assert not list(folder.iterdir()), f"left behind: {list(folder.iterdir())}"


@pytest.mark.parametrize("writer", ["bytes", "json", "checkpoint"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, full_disk, writer):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(UserError) as err:
        if writer == "bytes":
            write_bytes_atomic(folder / "plot.png", b"x" * 5000)
        elif writer == "json":
            write_json_atomic(folder / "metrics.json", {"k": list(range(1000))})
        else:
            ckpt.save_checkpoint({"model": {"w": torch.zeros(10_000)}, "step": 1}, folder, 1)
    _assert_disk_full(err, folder)
    if writer == "bytes":
        assert "needs 5000 bytes" in str(err.value)


def test_a_full_disk_while_writing_a_shard_is_one_line(tmp_path, monkeypatch, shards):
    """The shard writer (its own temp file, outside the atomic writers): one line naming the folder, no .tmp left."""
    import components.data.shards.write as w
    from components.config import ShardConfig
    from components.data.shards.stage import run_shard

    real_open = open
    monkeypatch.setattr(w, "open", lambda p, mode="r", *a, **k: _FullDisk(real_open(p, mode, *a, **k), 2000),
                        raising=False)
    out = tmp_path / "shards"
    with pytest.raises(UserError) as err:
        run_shard(ShardConfig(max_count=16, workers=1), shards.parent / "raw", out, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "no space left" in msg and "bytes" in msg, msg
    assert not list(out.rglob("*.tar")) and not list(out.rglob("*.tmp")) and not (out / "index.json").exists()
