"""Shards in the stack's S3 bucket: the shard stage uploads them (``shard.url``), pretraining reads them and gets the
loss of the same local shards bit for bit, a shard deleted or damaged in the bucket is counted lost against
``index.json``, per-rank splitting names the same shards as locally, and the downstream stages' segmentation source
reads its manifest and labelled samples from the bucket."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from components.config import DataConfig, PretrainConfig, ScenesConfig, ShardConfig
from components.config.params_file import render
from components.data.loading.loader import iterate_samples
from components.data.prepare.stage import run_prepare
from components.data.scenes.stage import generate_scenes
from components.data.segmentation.sources import open_shards
from components.data.shards.index import expected_counts, join_root, read_index, split_urls, url_fs
from components.data.shards.stage import run_shard, upload_shards
from components.errors import UserError
from components.pretrain.plan import make_plan
from components.pretrain.stage import run_pretrain

pytestmark = pytest.mark.stack

TINY = dict(image_size=64, num_workers=2, log_every_steps=1, batch_size=8, epochs=1, samples_per_epoch=16)


@pytest.fixture(scope="module")
def s3(stack, tmp_path_factory):
    """The stack's S3 keys and endpoint in this process's env (as after ``source stack.env``), and the tiny scenes
    sharded locally and uploaded by the shard stage (``shard.url``): ``(local root, S3 root, raw folder)``."""
    saved = dict(os.environ)
    os.environ.update(stack.env)
    root = tmp_path_factory.mktemp("s3_shards")
    url = f"s3://slotcon/tests/{uuid.uuid4().hex[:8]}/shards"
    try:
        generate_scenes(ScenesConfig(num_train=48, num_val=8, image_size=64), root / "scenes")
        run_prepare(DataConfig(), root / "scenes", root / "raw", progress=False)
        metrics = run_shard(ShardConfig(max_count=16, workers=1, url=url), root / "raw", root / "shards",
                            progress=False)
        assert metrics["upload"]["files"] == 3 + 1 + 2 + 1  # train + val shards, manifests, index.json
        yield root / "shards", url, root / "raw"
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _pretrain(cfg: PretrainConfig, shards: str | Path, out: Path) -> dict:
    torch.set_num_threads(1)
    return run_pretrain(cfg, shards, out / "m", out / "ck", progress=False)


def test_uploaded_root_reads_like_the_local_one(s3):
    local, url, _ = s3
    assert read_index(url) == read_index(local)
    fs, base = url_fs(url)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(base)) == sorted(
        p.name for p in local.rglob("*") if p.is_file())
    for split in read_index(local)["splits"]:
        assert [u.rsplit("/", 1)[1] for u in split_urls(url, split)] == [Path(u).name for u in split_urls(local, split)]


def test_pretraining_from_s3_equals_the_local_run(s3, tmp_path):
    local, url, _ = s3
    cfg = PretrainConfig(**TINY)
    a = _pretrain(cfg, local, tmp_path / "local")
    b = _pretrain(cfg, url, tmp_path / "s3")
    assert b["lost_samples"] == 0
    assert a["loss"] == b["loss"] and a["first_epoch_loss"] == b["first_epoch_loss"]  # the same bytes, same order


def test_cli_default_shards_read_shard_url(s3, tmp_path):
    """``slotcon pretrain`` with the default ``--shards`` reads ``shard.url``: an empty prefix is the one-line error
    naming the URL's index.json (not a local ``s3:/...`` path)."""
    url = f"s3://slotcon/tests/{uuid.uuid4().hex[:8]}/empty"
    params = tmp_path / "params.yaml"
    params.write_text(render().replace("  enabled: true ", "  enabled: false", 1).replace('  url: ""', f"  url: {url}"))
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "components", "pretrain", "--params", str(params), "--out", "m",
                          "--checkpoints", "ck", "--metrics", "m.json", "--plots", "p"], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"{url}/index.json: not found" in out.stderr and "Traceback" not in out.stderr


def test_ranks_split_the_s3_shards_as_the_local_ones(s3):
    local, url, _ = s3
    cfg = PretrainConfig(**TINY)
    for rank in (0, 1):
        p_local, p_s3 = make_plan(cfg, local, 2, rank), make_plan(cfg, url, 2, rank)
        assert p_s3.urls == tuple(join_root(url, os.path.relpath(u, local)) for u in p_local.urls)
        assert p_s3.shard_samples == p_local.shard_samples and p_s3.data_signature == p_local.data_signature


def test_segmentation_source_reads_the_s3_root(s3):
    local, url, _ = s3
    a, b = open_shards(local, "val"), open_shards(url, "val")
    assert a.keys() == b.keys() and len(b.urls) == len(a.urls) == 1 and b.urls[0].startswith(url)
    keys = a.keys()[:3]
    assert a.subset(keys).items == b.subset(keys).items  # labelled samples read into memory from the bucket


def test_deleted_and_damaged_shards_in_the_bucket_are_counted_lost(s3, tmp_path):
    local, _, _ = s3
    url = f"s3://slotcon/tests/{uuid.uuid4().hex[:8]}/damaged"
    upload_shards(local, url, read_index(local))
    fs, _ = url_fs(url)
    train = read_index(local)["pretrain"][0]
    shards = split_urls(url, train)
    fs.rm(url_fs(shards[0])[1])  # 16 samples gone
    data = fs.cat_file(url_fs(shards[1])[1])
    fs.pipe_file(url_fs(shards[1])[1], data[: len(data) // 2])  # cut mid-archive: the second half is lost
    row = pq.read_table(local / train / "manifest.parquet").to_pylist()[2 * 16 + 3]  # 4th sample of the 3rd shard
    data = bytearray(fs.cat_file(url_fs(shards[2])[1]))
    data[row["offset"] + 512 + 100] ^= 0xFF  # one flipped byte inside its JPEG: same size, other sha256
    fs.pipe_file(url_fs(shards[2])[1], bytes(data))
    it = iterate_samples(shards, decode="bytes", expected_counts=expected_counts(url, train))
    keys = [s["__key__"] for s in it]
    lost = it.stats["lost_by_shard"]
    assert lost[shards[0]] == 16 and 0 < lost[shards[1]] < 16 and lost[shards[2]] == 1
    assert row["key"] not in keys and it.stats["lost"] == 48 - len(keys)
    assert "sha256_mismatch" in it.stats["skipped_by_reason"]
    with pytest.raises(UserError, match=r"lost") as err:
        _pretrain(PretrainConfig(**{**TINY, "num_workers": 0, "samples_per_epoch": 48}, max_lost_fraction=0.1),
                  url, tmp_path / "p")
    assert "\n" not in str(err.value)
    print(err.value)
