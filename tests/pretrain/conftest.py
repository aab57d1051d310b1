"""Fixtures the pretraining tests (tests/pretrain/ and its methods/) share: ``run_pretrain_in`` and ``one_thread``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures import expose


def run_pretrain_in(cfg, shards: Path, out: Path, **kw):
    """``run_pretrain`` with every output under ``out`` (models/, ckpt/, metrics.json, plots/), no progress bars."""
    from components.pretrain.stage import run_pretrain  # lazy: the pretrain stage costs ~5 s at start-up

    return run_pretrain(cfg, shards, out / "models", out / "ckpt", out / "metrics.json", out / "plots",
                        progress=False, **kw)


# the helper above as a fixture of the same name
run_pretrain_in_fixture = expose(run_pretrain_in)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): tiny steps gain little from two, and a busy 2-core box
    makes two threads spin. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
