"""components/data/workers.py: the per-output lock, the worker pool, bounded maps and the progress line (in-process;
the cross-process faults -- a second `slotcon shard`, a killed main process -- are in tests/faults/)."""
from __future__ import annotations

import os

import pytest

from components.data.workers import Meter, hold_output, run_bounded, work_dir, worker_pool
from components.errors import UserError


def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    out = tmp_path / "shards"
    with hold_output(out, "slotcon shard") as work:
        assert work == work_dir(out) == tmp_path / ".shards.work.tmp"
        assert (work / "LOCK").read_text().startswith(f"{os.getpid()} slotcon shard since ")
        with pytest.raises(UserError) as exc:
            with hold_output(out, "slotcon shard"):
                pass
        msg = str(exc.value)
        assert "\n" not in msg and msg.startswith(f"{out}: held by PID {os.getpid()} (slotcon shard since ")
        assert "finished work is kept" in msg
    with hold_output(out, "slotcon shard"):  # released on exit
        pass


def test_lock_survives_its_folder_being_removed_by_the_holder(tmp_path):
    import shutil

    out = tmp_path / "raw"
    with hold_output(out, "a") as work:
        shutil.rmtree(work)  # what a finished run does while still holding the lock
    with hold_output(out, "b") as work:  # a fresh folder and lock file
        assert (work / "LOCK").read_text().split()[1] == "b"


def _square(x: int) -> int:
    if x == 7:
        raise ValueError("seven")
    return x * x


def test_run_bounded_inline_and_in_a_pool():
    assert list(run_bounded(None, _square, range(5), 2)) == [0, 1, 4, 9, 16]
    with worker_pool(2) as pool:
        assert sorted(run_bounded(pool, _square, iter(range(6)), 2)) == [0, 1, 4, 9, 16, 25]
    with pytest.raises(ValueError, match="seven"):
        with worker_pool(2) as pool:
            list(run_bounded(pool, _square, range(10), 2))


def test_meter_prints_throughput_lines_in_logs(capsys):
    m = Meter("shard", 100, progress=True, every=0.0)  # stderr is not a terminal under pytest: plain lines
    m.update(10, 5_000_000)
    m.close()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("shard: 10/100 images, ") and "img/s" in line and "MB/s" in line and "ETA" in line
    quiet = Meter("x", 5, progress=False, every=0.0)
    quiet.update(5)
    assert capsys.readouterr().err == ""
