"""Two nodes x 1 process on loopback (two `slotcon pretrain` launches with NODE_RANK 0 and 1, gloo on CPU, each in
its own checkout as on two machines): it trains, only node 0 writes outputs, and the result equals one node with two
processes bit for bit; a node that stops answering stops the other within a bound, and a re-run resumes."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
PRE = dict(image_size=64, num_workers=0, log_every_steps=1, batch_size=8, epochs=1, samples_per_epoch=16,
           slotcon=dict(arch="resnet18", num_prototypes=8, dim_hidden=32, dim_out=16, warmup_epochs=0))
OUTS = ["--out", "models/pretrain", "--checkpoints", "checkpoints/pretrain", "--metrics", "metrics/pretrain.json",
        "--plots", "plots/pretrain"]


def _checkout(root: Path, **pretrain) -> Path:
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": False}, "pretrain": {**PRE, **pretrain}}))
    return root


def _launch(cwd: Path, shards: Path, **env) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID",
                                                             "DVC_STAGE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")}
    return subprocess.Popen([sys.executable, "-m", "components", "pretrain", "--params", "params.yaml", "--shards",
                             str(shards), *OUTS], cwd=cwd, env={**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                                                **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.ddp
def test_two_nodes_equal_one_node_with_two_processes(shards, tmp_path, free_port):
    single = _checkout(tmp_path / "single", nproc_per_node=2)
    _finish(_launch(single, shards))
    nodes = [_checkout(tmp_path / f"node{r}", nnodes=2) for r in (0, 1)]
    procs = [_launch(nodes[r], shards, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port), NODE_RANK=str(r))
             for r in (0, 1)]
    for p in procs:
        _finish(p)

    two = json.loads((nodes[0] / "metrics/pretrain.json").read_text())
    one = json.loads((single / "metrics/pretrain.json").read_text())
    assert two["world_size"] == one["world_size"] == 2 and two["steps"] == one["steps"] == 2
    assert two["loss"] == one["loss"]
    a = torch.load(nodes[0] / "models/pretrain/last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(single / "models/pretrain/last.pt", map_location="cpu", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # node 1 holds ranks > 0 only: it writes no metrics, model or plots (DVC on node 0 records the outputs)
    assert not any((nodes[1] / d).exists() for d in ("metrics", "models", "plots"))


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.faults
def test_a_node_that_stops_answering_stops_the_other_and_a_rerun_resumes(shards, tmp_path, free_port):
    """Node 1 freezes after node 0's first checkpoint (SIGSTOP: a hung machine or a cut cable, its sockets stay
    open), then is killed: node 0 stops within SLOTCON_DDP_TIMEOUT_S with one line naming rank 1 and the checkpoint;
    both nodes re-run the same command, resume, and end equal to a straight run."""
    more = dict(epochs=2, save_every_steps=1)  # 4 steps, a checkpoint after each
    straight = _checkout(tmp_path / "straight", nproc_per_node=2, **more)
    _finish(_launch(straight, shards))
    nodes = [_checkout(tmp_path / f"node{r}", nnodes=2, **more) for r in (0, 1)]
    env = dict(MASTER_ADDR="127.0.0.1", SLOTCON_DDP_TIMEOUT_S="10")
    procs = [_launch(nodes[r], shards, MASTER_PORT=str(free_port), NODE_RANK=str(r), **env) for r in (0, 1)]
    t0 = time.monotonic()
    while not list((nodes[0] / "checkpoints").glob("*/*/step_*.pt")) and time.monotonic() - t0 < 240:
        time.sleep(0.05)
    node1 = _tree(procs[1].pid)
    _signal_all(node1, signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        out, _ = procs[0].communicate(timeout=60)
    finally:
        _signal_all(_tree(procs[0].pid), signal.SIGKILL)
        _signal_all(node1, signal.SIGKILL)
        procs[1].communicate()
    took = time.monotonic() - t_stop
    assert procs[0].returncode != 0 and took < 60, (took, out[-3000:])
    line = next((ln for ln in out.splitlines() if "stopped answering" in ln), "")
    assert line.startswith("slotcon pretrain: error: pretrain[slotcon]: rank 1 (node 1) stopped answering at step")
    assert "SLOTCON_DDP_TIMEOUT_S=10 s" in line and "last checkpoint: step" in line, out[-3000:]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_launch(nodes[r], shards, MASTER_PORT=str(port), NODE_RANK=str(r), **env) for r in (0, 1)]
    rerun = [_finish(p) for p in procs][0]
    assert "resuming from" in rerun
    a = json.loads((nodes[0] / "metrics/pretrain.json").read_text())
    b = json.loads((straight / "metrics/pretrain.json").read_text())
    assert a["resumed"] and a["steps"] == b["steps"] == 4 and a["loss"] == b["loss"]
    ma = torch.load(nodes[0] / "models/pretrain/last.pt", map_location="cpu", weights_only=True)["model"]
    mb = torch.load(straight / "models/pretrain/last.pt", map_location="cpu", weights_only=True)["model"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
