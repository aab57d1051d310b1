"""Faults in ``prepare`` / ``shard``: two shard runs into one folder, the main process killed (its workers must die
too), kill -9 mid-shard and mid-prepare then resume (byte-identical, finished work kept).

The stage runs in a child interpreter whose image reads are slowed or held at a gate (a file the test creates), so
the test can act at a chosen moment; workers are forked, so they inherit the slowed reader.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.config import DataConfig, ShardConfig
from components.data.prepare.stage import run_prepare
from components.data.shards.stage import run_shard, verify_shards

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # each starts a fresh interpreter: 10-30 s on a busy 2-core box
REPO = Path(__file__).resolve().parents[2]

SHARD_CHILD = r"""
import sys, time
from pathlib import Path
import components.data.shards.write as sw
raw, out, gate, delay, params, metrics = sys.argv[1:7]
real = sw._image_member
def held(s, q):
    while not Path(gate).exists():  # the test opens the gate when it has looked
        time.sleep(0.05)
    time.sleep(float(delay))
    return real(s, q)
sw._image_member = held
from components.cli import main
sys.exit(main(["shard", "--raw", raw, "--out", out, "--params", params, "--metrics", metrics, "--no-progress"]))
"""

PREPARE_CHILD = r"""
import sys, time
import components.data.prepare.tree as pt
from components.config import DataConfig
root, out, delay = sys.argv[1:4]
real = pt.probe_image
def slow(path, policy):
    time.sleep(float(delay))
    return real(path, policy)
pt.probe_image = slow
pt.run_prepare_tree(DataConfig(source="folder", root=root, workers=2), out, progress=False, chunk=4)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _wait(cond, timeout: float = 90.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's wait is missing


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def raw(tmp_path, write_coco):
    root = write_coco(tmp_path / "coco", n_train=14, n_val=5)
    run_prepare(DataConfig(workers=1), root, tmp_path / "raw", progress=False)
    params = tmp_path / "params.yaml"
    params.write_text("tracking:\n  enabled: false\nshard:\n  workers: 2\n  max_count: 2\n")
    return tmp_path / "raw", params


def _start_shard(tmp_path, raw_dir, params, gate, delay: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SHARD_CHILD, str(raw_dir), str(tmp_path / "shards"), str(gate), str(delay),
         str(params), str(tmp_path / "shard.json")], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def _lock_held_by(tmp_path, pid: int) -> bool:
    lock = tmp_path / ".shards.work.tmp" / "LOCK"
    try:
        return lock.read_text().split()[0] == str(pid)
    except (OSError, IndexError):
        return False


def test_second_shard_into_the_same_folder_stops_at_once_and_the_first_finishes(raw, tmp_path):
    raw_dir, params = raw
    gate = tmp_path / "gate"
    first = _start_shard(tmp_path, raw_dir, params, gate, 0.0)
    try:
        work = tmp_path / ".shards.work.tmp"
        # settled: lock held, both workers waiting at the gate inside their first shard
        _wait(lambda: _lock_held_by(tmp_path, first.pid) and len(list(work.rglob(".*.tar.tmp"))) == 2,
              what="first shard run")
        work_before = sorted((str(p), p.stat().st_size) for p in work.rglob("*"))
        t = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "components", "shard", "--raw", str(raw_dir), "--out", str(tmp_path / "shards"),
             "--params", str(params), "--metrics", str(tmp_path / "shard.json"), "--no-progress"],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip()
        assert err.count("\n") == 0 and f"held by PID {first.pid}" in err and "slotcon shard" in err, err
        assert time.monotonic() - t < 60  # it stopped; it did not wait for the gate
        assert sorted((str(p), p.stat().st_size) for p in work.rglob("*")) == work_before  # untouched
        assert first.poll() is None
    finally:
        gate.touch()
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert verify_shards(tmp_path / "shards", progress=False)["samples"] == 19
    run_shard(ShardConfig(max_count=2, workers=1), raw_dir, tmp_path / "straight", progress=False)
    assert _tree_bytes(tmp_path / "shards") == _tree_bytes(tmp_path / "straight")


def test_killing_the_shard_main_process_leaves_no_orphaned_workers(raw, tmp_path):
    raw_dir, params = raw
    child = _start_shard(tmp_path, raw_dir, params, tmp_path / "never", 0.0)  # workers block inside a task
    try:
        _wait(lambda: _lock_held_by(tmp_path, child.pid) and len(_children(child.pid)) == 2, what="workers")
        workers = _children(child.pid)
        assert all(_alive(w) for w in workers)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
    try:
        _wait(lambda: not any(_alive(w) for w in workers), timeout=15, what="the workers to die with their parent")
    finally:  # a failing run must not leave orphans behind on the test machine
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    # the kernel released the lock with its holder: the next run proceeds
    m = run_shard(ShardConfig(max_count=2, workers=1), raw_dir, tmp_path / "shards", progress=False)
    assert m["verified_samples"] == 19


def test_kill9_mid_shard_then_resume_keeps_finished_shards_and_is_byte_identical(raw, tmp_path):
    raw_dir, params = raw
    gate = tmp_path / "gate"
    gate.touch()
    child = _start_shard(tmp_path, raw_dir, params, gate, 0.25)
    done_dir = tmp_path / ".shards.work.tmp" / "train2017"
    try:
        _wait(lambda: len(list(done_dir.glob("*.done.json"))) >= 2 if done_dir.is_dir() else False,
              what="two finished shards")
        workers = _children(child.pid)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
    _wait(lambda: not any(_alive(w) for w in workers), timeout=15, what="the workers to die")
    finished = {p.name.removesuffix(".done.json"): (done_dir / p.name.removesuffix(".done.json")).stat().st_ino
                for p in done_dir.glob("*.done.json")}
    assert len(finished) >= 2 and not (tmp_path / "shards" / "index.json").exists()
    with pytest.raises(Exception, match="not completed"):
        verify_shards(tmp_path / "shards", progress=False)
    m = run_shard(ShardConfig(max_count=2, workers=2), raw_dir, tmp_path / "shards", progress=False)
    assert m["shards_reused"] >= len(finished) and m["verified_samples"] == 19
    for name, ino in finished.items():  # renamed into place, never rewritten
        assert (tmp_path / "shards" / "train2017" / name).stat().st_ino == ino
    run_shard(ShardConfig(max_count=2, workers=1), raw_dir, tmp_path / "straight", progress=False)
    assert _tree_bytes(tmp_path / "shards") == _tree_bytes(tmp_path / "straight")


def test_kill9_mid_prepare_then_resume_reuses_parts_and_is_byte_identical(tmp_path, write_messy_folder):
    from components.data.prepare.tree import run_prepare_tree

    root = write_messy_folder(tmp_path / "photos")
    out = tmp_path / "raw"
    child = subprocess.Popen([sys.executable, "-c", PREPARE_CHILD, str(root), str(out), "0.3"], cwd=REPO, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = tmp_path / ".raw.work.tmp" / "folder" / "train"
    try:
        _wait(lambda: len(list(parts.glob("part-*.parquet"))) >= 2 if parts.is_dir() else False, what="two parts")
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
    n_parts = len(list(parts.glob("part-*.parquet")))
    assert not (out / "index.json").exists() and not list(parts.glob("*.tmp"))
    cfg = DataConfig(source="folder", root=str(root), workers=1)
    m = run_prepare_tree(cfg, out, progress=False, chunk=4)
    assert m["parts_reused"] >= n_parts >= 2
    straight = run_prepare_tree(cfg, tmp_path / "straight", progress=False, chunk=4)
    assert straight["parts_reused"] == 0 and m["splits"] == straight["splits"]
    assert _tree_bytes(out) == {k: v for k, v in _tree_bytes(tmp_path / "straight").items()}
