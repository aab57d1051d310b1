"""Fixtures the pretraining tests (tests/pretrain/ and its methods/) share: ``run_pretrain_in``."""
from __future__ import annotations

from pathlib import Path

from fixtures import expose


def run_pretrain_in(cfg, shards: Path, out: Path, **kw):
    """``run_pretrain`` with every output under ``out`` (models/, ckpt/, metrics.json, plots/), no progress bars."""
    from components.pretrain.stage import run_pretrain  # lazy: the pretrain stage costs ~5 s at start-up

    return run_pretrain(cfg, shards, out / "models", out / "ckpt", out / "metrics.json", out / "plots",
                        progress=False, **kw)


# the helper above as a fixture of the same name
run_pretrain_in_fixture = expose(run_pretrain_in)
