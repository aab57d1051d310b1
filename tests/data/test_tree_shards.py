"""Shards from image trees: original bytes kept, transcoded images upright on every decode path, labels carried,
the tar bytes identical to webdataset's TarWriter, and pretraining running from ImageNet-layout shards."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from components.config import DataConfig, ShardConfig
from components.data.prepare.manifest import read_manifest
from components.data.prepare.stage import run_prepare
from components.data.shards.stage import read_index, run_shard, split_urls, verify_shards


@pytest.fixture(scope="module")
def messy_shards(tmp_path_factory, write_messy_folder):
    base = tmp_path_factory.mktemp("messy_shards")
    root = write_messy_folder(base / "photos")
    run_prepare(DataConfig(source="folder", root=str(root), exclude=["**/thumbs/**"], workers=1), "x",
                base / "raw", progress=False)
    m = run_shard(ShardConfig(max_count=4, workers=2), base / "raw", base / "shards", progress=False)
    return root, base, m


def _members(url):
    with tarfile.open(url) as tf:
        return {ti.name: tf.extractfile(ti).read() for ti in tf}


def test_tree_shards_keep_original_bytes_and_verify(messy_shards, messy_outcome):
    root, base, m = messy_shards
    assert m["samples"] == messy_outcome.ok == m["verified_samples"] and m["transcoded"] == messy_outcome.transcode
    assert m["shards"] == 5 and m["shards_reused"] == 0
    prep = {r["key"]: r for r in read_manifest(base / "raw" / "folder" / "train" / "manifest.parquet")[0]}
    rows, _ = read_manifest(base / "shards" / "train" / "manifest.parquet")
    members = {}
    for url in split_urls(base / "shards", "train"):
        members.update(_members(url))
    for r in rows:
        p = prep[r["key"]]
        jpg = members[f"{r['key']}.jpg"]
        original = (root / p["file_name"]).read_bytes()
        assert r["source_sha1"] == p["sha1"] == hashlib.sha1(original).hexdigest()
        assert r["transcoded"] == p["transcode"]
        if not p["transcode"]:
            assert jpg == original  # bytes in = bytes out
        else:
            assert jpg.startswith(b"\xff\xd8\xff") and hashlib.sha1(jpg).hexdigest() == r["sha1"]
        meta = json.loads(members[f"{r['key']}.json"])
        assert meta["image"]["file_name"] == p["file_name"] and meta["annotations"] == []
        assert (meta["image"]["width"], meta["image"]["height"]) == (p["width"], p["height"])
    assert read_index(base / "shards")["splits"]["train"]["shard_samples"] == [4, 4, 4, 4, 1]


def test_orientation_is_the_same_on_every_decode_path(messy_shards, messy_outcome):
    """The rotated photo decodes upright, at its displayed size, through the loader's CPU path (decode_rgb), the
    bytes path the GPU uses (decode_images: nvJPEG on CUDA, libjpeg-turbo here) and PIL."""
    from PIL import Image

    from components.data.loading.decode import decode_images
    from components.data.loading.loader import iterate_samples

    root, base, _ = messy_shards
    urls = split_urls(base / "shards", "train")
    rgb = {s["meta"]["image"]["file_name"]: s["image"] for s in iterate_samples(urls, decode="rgb")}
    raw = {s["meta"]["image"]["file_name"]: s["image"] for s in iterate_samples(urls, decode="bytes")}
    assert len(rgb) == len(raw) == messy_outcome.ok
    name = "photos/rotated_6.jpg"
    cpu = rgb[name]
    dev = decode_images([torch.frombuffer(bytearray(raw[name]), dtype=torch.uint8)], torch.device("cpu"))[0]
    with Image.open(io.BytesIO(raw[name])) as im:
        pil = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    for img in (cpu, dev, pil):
        assert tuple(img.shape) == (3, 48, 32)
        assert img[:, :6, -6:].float().mean() > 240  # the marker sits top-right once the photo is upright
    assert torch.equal(cpu, dev) and (cpu.float() - pil.float()).abs().mean() < 2
    for name, img in rgb.items():  # every sample, whatever its source format, decodes to 3-channel uint8
        assert img.dtype == torch.uint8 and img.shape[0] == 3, name


def test_imagenet_shards_carry_labels(tmp_path, write_imagenet):
    root = write_imagenet(tmp_path / "imagenet")
    run_prepare(DataConfig(source="imagenet", root=str(root), workers=1), "x", tmp_path / "raw", progress=False)
    m = run_shard(ShardConfig(max_count=5, workers=1), tmp_path / "raw", tmp_path / "shards", progress=False)
    assert m["splits"]["train"] == {"samples": 12, "shards": 3, "bytes": m["splits"]["train"]["bytes"]}
    index = read_index(tmp_path / "shards")
    assert index["pretrain"] == ["train"] and index["val"] == "val" and len(index["classes"]) == 3
    labels = {}
    for url in split_urls(tmp_path / "shards", "train"):
        for name, data in _members(url).items():
            if name.endswith(".json"):
                image = json.loads(data)["image"]
                labels[image["file_name"]] = (image["label"], image["label_name"])
    assert labels["train/n01442764/n01442764_2.JPEG"] == (2, "n01442764") and len(labels) == 12


def test_tar_bytes_equal_webdataset_tarwriter(tmp_path):
    """The writer builds tars with tarfile (no webdataset/torch import per worker): same bytes as TarWriter."""
    import webdataset as wds

    from components.data.shards.write import FIXED_MTIME, TAR_MODE, TAR_USER, write_shard

    img = tmp_path / "a.jpg"
    img.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 3)
    seg = tmp_path / "a.png"
    seg.write_bytes(b"\x89PNG" + b"x" * 700)
    sha = hashlib.sha1(img.read_bytes()).hexdigest()
    samples = [{"key": f"k{i}", "id": i, "image": str(img), "sha1": sha, "meta": b'{"i":%d}' % i,
                "seg": str(seg) if i % 2 else None, "num_annotations": 0, "width": 1, "height": 1} for i in range(3)]
    write_shard({"path": str(tmp_path / "ours.tar"), "samples": samples})
    buf = io.BytesIO()
    with wds.TarWriter(buf, user=TAR_USER, group=TAR_USER, mode=TAR_MODE, encoder=False, mtime=FIXED_MTIME) as tw:
        for s in samples:
            sample = {"__key__": s["key"], "jpg": img.read_bytes(), "json": s["meta"]}
            if s["seg"]:
                sample["seg.png"] = seg.read_bytes()
            tw.write(sample)
    assert (tmp_path / "ours.tar").read_bytes() == buf.getvalue()


@pytest.mark.slow  # imports torchvision + 2 SlotCon steps: ~20 s on a busy 2-core machine
def test_pretraining_runs_from_imagenet_shards(tmp_path, write_imagenet):
    from components.config import PretrainConfig
    from components.pretrain.stage import run_pretrain

    root = write_imagenet(tmp_path / "imagenet", classes=4, per_class=4)
    run_prepare(DataConfig(source="imagenet", root=str(root), workers=1), "x", tmp_path / "raw", progress=False)
    run_shard(ShardConfig(max_count=4, workers=1), tmp_path / "raw", tmp_path / "shards", progress=False)
    verify_shards(tmp_path / "shards", progress=False)
    cfg = PretrainConfig(image_size=64, num_workers=0, log_every_steps=1, batch_size=8, epochs=1,
                         slotcon=dict(arch="resnet18", num_prototypes=8, dim_hidden=32, dim_out=16, warmup_epochs=0))
    m = run_pretrain(cfg, tmp_path / "shards", tmp_path / "models", tmp_path / "ckpt", tmp_path / "metrics.json",
                     tmp_path / "plots", progress=False)
    assert (tmp_path / "models" / "last.pt").is_file()
    assert m["steps_this_run"] == 16 // 8 and np.isfinite(m["loss"])  # 16 training images (2 of them transcoded)
