"""Two nodes x 1 process on loopback (two `slotcon pretrain` launches with NODE_RANK 0 and 1, gloo on CPU, each in
its own checkout as on two machines): it trains, only node 0 writes outputs, and the result equals one node with two
processes bit for bit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
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
