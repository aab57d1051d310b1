"""The throughput benchmarks run end to end in their quick mode and print their ratio lines (figures are not
checked: they depend on the machine and its load)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", "--dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_shard_benchmark_quick_prints_ratios_scaling_and_plan_rss(tmp_path):
    out = _run("shard_throughput.py", tmp_path)
    ratios = re.findall(r"^\s*(tree|coco-size) \|.*\| +([12]) \|.*ratio (\d+\.\d\d) \(", out, re.M)
    assert sorted((name, w) for name, w, _ in ratios) == [("coco-size", "1"), ("coco-size", "2"), ("tree", "1"),
                                                           ("tree", "2")], out
    assert all(float(r) > 0 for _, _, r in ratios)
    assert len(re.findall(r"^\s+\d+ \|\s+[\d.]+ \|\s+[\d.]+ \|\s+\d+$", out, re.M)) == 2, out  # the us/img rows
    assert re.search(r"plan of 5000 entries: \d+ shards .* peak RSS \d+ MB", out), out
    assert not list(tmp_path.iterdir())  # every input and output deleted as it goes


@pytest.mark.slow  # imports torch and starts loader workers twice per side: ~20 s on a busy 2-core machine
def test_loader_benchmark_quick_prints_ratio(tmp_path):
    out = _run("loader_throughput.py", tmp_path)
    assert re.search(r"^ratio ours/authors \d+\.\d\d \(range", out, re.M), out
    assert re.search(r"^ratio ours-main-process/authors \d+\.\d\d \(range", out, re.M), out
