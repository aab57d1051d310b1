"""``benchmarks/gpu_check.py --dry-run``: the GPU check's code paths run on the CPU at tiny settings, so the script is
known to work before a GPU is lent."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_runs_every_phase_and_writes_one_json(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    out = tmp_path / "gpu_check.json"
    res = gpu_check.main(["--dry-run", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["dry_run"] is True and saved["device"].startswith("cpu")
    for phase in ("pytest_gpu", "pretrain_slotcon_eager", "pretrain_sim_eager", "scenes_shards", "detect", "segment",
                  "nvjpeg"):
        assert res[phase]["ok"], (phase, res[phase])
    pre = res["pretrain_slotcon_eager"]
    assert pre["end_to_end_img_s"] > 0 and pre["model_only_img_s"] > 0 and pre["data_only_img_s"] > 0
    assert res["detect"]["iters"] == 2 and res["segment"]["iters"] == 2
    assert set(res["nvjpeg"]) >= {"rgb", "gray", "cmyk", "corrupt"}
    assert res["nvjpeg"]["gray"].startswith("decoded") and res["nvjpeg"]["cmyk"].startswith("decoded")
