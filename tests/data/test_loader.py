"""The shard loader (components/data/loading/loader.py): decoding, corrupt-data skips, rank x worker splitting, URLs."""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from components.data.loading.loader import iterate_samples, make_loader
from components.errors import UserError


def _keys(loader) -> list[str]:
    return [s["key"] for batch in loader for s in batch]


def test_decode_rgb_gray_cmyk_png_and_bytes(tmp_path, jpeg_bytes, png_bytes, loader_sample):
    rng = np.random.default_rng(0)
    samples = [loader_sample("rgb", rng), loader_sample("gray", rng), loader_sample("cmyk", rng, mode="CMYK"),
               loader_sample("png", rng)]
    gray = rng.integers(0, 255, (24, 32), dtype=np.uint8)
    samples[1]["jpg"] = jpeg_bytes(gray)
    png_arr = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    samples[3]["jpg"] = png_bytes(png_arr)  # a PNG in a .jpg member: torchvision refuses, PIL decodes it
    p = tmp_path / "d-000000.tar"
    with wds.TarWriter(str(p), encoder=False) as tw:
        for s in samples:
            tw.write(s)
    out = {s["key"]: s for s in iterate_samples(str(p), decode="rgb", with_seg=True)}
    for k in ("rgb", "gray", "cmyk", "png"):
        img = out[k]["image"]
        assert img.dtype == torch.uint8 and img.shape == (3, 24, 32), (k, img.shape)
        assert out[k]["seg"].dtype == torch.uint8 and out[k]["seg"].shape == (24, 32)
        assert out[k]["url"] == str(p) and out[k]["meta"]["image"]["id"] == k
    g = out["gray"]["image"]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])  # grey replicated to RGB
    ref = np.asarray(Image.open(io.BytesIO(samples[1]["jpg"])).convert("L")).astype(int)
    assert np.abs(g[0].numpy().astype(int) - ref).max() <= 1
    cmyk_ref = np.asarray(Image.open(io.BytesIO(samples[2]["jpg"])).convert("RGB")).astype(int)
    assert np.abs(out["cmyk"]["image"].permute(1, 2, 0).numpy().astype(int) - cmyk_ref).mean() < 2
    assert np.array_equal(out["png"]["image"].permute(1, 2, 0).numpy(), png_arr)
    raw = list(iterate_samples(str(p), decode="bytes"))
    assert [s["image"] for s in raw] == [s["jpg"] for s in samples] and all(s["seg"] is None for s in raw)


def test_corrupt_samples_and_truncated_tar_are_skipped_and_counted(tmp_path, write_shards, loader_sample):
    rng = np.random.default_rng(1)
    urls = write_shards(tmp_path, 3, 6, seed=1)
    bad = [loader_sample(f"bad{i}", rng) for i in range(3)]
    bad[0]["jpg"] = b"\xff\xd8\xff" + bytes(50)  # undecodable JPEG
    bad[1]["json"] = b"{not json"
    del bad[2]["json"]  # a sample missing a member
    p = tmp_path / "s-000003.tar"
    with wds.TarWriter(str(p), encoder=False) as tw:
        for s in bad + [loader_sample("fine", rng)]:
            tw.write(s)
    urls.append(str(p))
    whole = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(whole[: len(whole) // 2])  # truncated tar: the second half of shard 1 is gone
    loader = make_loader(urls, batch_size=4, num_workers=2, shuffle=True)
    keys = _keys(loader)
    assert "fine" in keys and not any(k.startswith("bad") for k in keys)
    assert len(keys) == len(set(keys)) and 12 + 1 + 1 <= len(keys) < 12 + 1 + 6  # some of shard 1 survives
    st = loader.stats
    assert st["samples"] == len(keys)
    by = st["skipped_by_reason"]
    assert by.get("bad_image") == 1 and by.get("bad_json") == 1 and by.get("truncated_tar") == 1, by
    assert 1 <= by.get("incomplete_sample", 0) <= 2  # bad2, and the sample cut in half (if the cut split one)
    assert st["skipped"] == sum(by.values()) == len(loader.errors)
    recs = {e["reason"]: e for e in loader.errors}
    assert recs["bad_json"]["key"] == "bad1" and recs["bad_json"]["url"] == str(p)
    assert recs["truncated_tar"]["url"] == urls[1] and recs["truncated_tar"]["after"].startswith("k001_")
    # the same in the fixed-order evaluation iterator (main process)
    it = iterate_samples(urls, decode="rgb")
    assert sorted(s["key"] for s in it) == sorted(keys)
    assert it.stats["skipped_by_reason"] == by


def test_two_ranks_two_workers_disjoint_cover(tmp_path, write_shards):
    urls = write_shards(tmp_path, 6, 5)
    everything = sorted(f"k{i:03d}_{j:03d}" for i in range(6) for j in range(5))
    per_rank = [
        _keys(make_loader(urls, batch_size=4, num_workers=2, rank=r, world_size=2, seed=3, epoch=1))
        for r in range(2)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == everything
    assert all(len(k) == len(set(k)) for k in per_rank)
    # another epoch permutes the shards differently, still a disjoint cover
    again = [_keys(make_loader(urls, batch_size=4, num_workers=2, rank=r, world_size=2, seed=3, epoch=2)) for r in range(2)]
    assert sorted(again[0] + again[1]) == everything and again != per_rank


def test_resampled_equal_batches_per_rank_and_repeatable(tmp_path, write_shards):
    urls = write_shards(tmp_path, 3, 5)  # fewer shards than ranks x workers is fine when resampling
    spe, bs = 41, 4
    counts, streams = [], []
    for r in range(2):
        loader = make_loader(urls, batch_size=bs, resampled=True, samples_per_epoch=spe, num_workers=2, rank=r,
                             world_size=2, seed=0, epoch=0, drop_last=True)
        batches = list(loader)
        assert len(loader) == spe // 2 // bs == 5
        counts.append(len(batches))
        assert all(len(b) == bs for b in batches)
        streams.append([s["key"] for b in batches for s in b])
    assert counts == [5, 5]
    assert streams[0] != streams[1]  # ranks draw differently
    same = list(make_loader(urls, batch_size=bs, resampled=True, samples_per_epoch=spe, num_workers=2, rank=0,
                            world_size=2, seed=0, epoch=0))
    assert [s["key"] for b in same for s in b] == streams[0]  # (seed, epoch, rank) -> the same stream
    other = list(make_loader(urls, batch_size=bs, resampled=True, samples_per_epoch=spe, num_workers=2, rank=0,
                             world_size=2, seed=0, epoch=1))
    assert [s["key"] for b in other for s in b] != streams[0]


def test_too_few_shards_for_ranks_times_workers(tmp_path, write_shards):
    urls = write_shards(tmp_path, 3, 2)
    with pytest.raises(UserError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 worker\(s\)"):
        make_loader(urls, batch_size=2, num_workers=2, rank=0, world_size=2)
    with pytest.raises(UserError, match="needs samples_per_epoch"):
        make_loader(urls, batch_size=2, resampled=True)
    with pytest.raises(UserError, match="s-000009.tar: shard not found"):
        make_loader(urls + [str(tmp_path / "s-000009.tar")], batch_size=2, resampled=True, samples_per_epoch=8)


def test_map_fn_collate_fn_and_seeded_worker_rng(tmp_path, write_shards):
    urls = write_shards(tmp_path, 4, 4)

    def draw(sample):
        sample["r"] = random.random() + float(torch.rand(1))  # crop parameters are drawn like this
        return sample

    def collate(samples):
        return {"images": torch.stack([s["image"] for s in samples]), "r": [s["r"] for s in samples],
                "keys": [s["key"] for s in samples]}

    def run(epoch):
        loader = make_loader(urls, batch_size=4, map_fn=draw, collate_fn=collate, num_workers=2, seed=7, epoch=epoch)
        return list(loader)

    a, b, c = run(0), run(0), run(1)
    assert a[0]["images"].shape == (4, 3, 24, 32) and a[0]["images"].dtype == torch.uint8
    assert [x["keys"] for x in a] == [x["keys"] for x in b] and [x["r"] for x in a] == [x["r"] for x in b]
    assert [x["r"] for x in a] != [x["r"] for x in c]


def test_url_forms_brace_pipe_fsspec(tmp_path, write_shards):
    import fsspec

    urls = write_shards(tmp_path, 3, 3)
    expected = sorted(f"k{i:03d}_{j:03d}" for i in range(3) for j in range(3))
    brace = str(tmp_path / "s-{000000..000002}.tar")
    assert sorted(s["key"] for s in iterate_samples(brace, decode="bytes")) == expected
    pipes = [f"pipe:cat {u}" for u in urls]
    assert sorted(_keys(make_loader(pipes, batch_size=2, decode="bytes", num_workers=0))) == expected
    fs = fsspec.filesystem("memory")
    mem = []
    for i, u in enumerate(urls):
        with fs.open(f"/slotcon-test/s-{i}.tar", "wb") as f:
            f.write(Path(u).read_bytes())
        mem.append(f"memory://slotcon-test/s-{i}.tar")
    got = list(iterate_samples(mem, decode="bytes"))
    assert sorted(s["key"] for s in got) == expected and got[0]["url"].startswith("memory://")
    assert sorted(_keys(make_loader([Path(u).as_uri() for u in urls], batch_size=3))) == expected
    # fsspec URLs open without patching WebDataset's global scheme table
    assert "memory" not in wds.gopen_schemes and "s3" not in wds.gopen_schemes


def test_iterate_samples_fixed_order(tmp_path, write_shards):
    urls = write_shards(tmp_path, 2, 4)
    keys = [s["key"] for s in iterate_samples(urls)]
    assert keys == [f"k{i:03d}_{j:03d}" for i in range(2) for j in range(4)]
    assert [s["key"] for s in iterate_samples(urls)] == keys


@pytest.mark.parametrize("cut", ["header_boundary", "inside_member", "inside_padding"])
def test_truncation_point(tmp_path, cut, write_shards):
    """tarfile ends *silently* at a header boundary; the loader must still see and count the truncation."""
    import tarfile

    (url,) = write_shards(tmp_path, 1, 4)
    data = Path(url).read_bytes()
    with tarfile.open(url) as tf:
        members = tf.getmembers()
    third = members[6]  # first member of the third sample (3 members per sample)
    at = {"header_boundary": third.offset, "inside_member": third.offset_data + 100,
          "inside_padding": members[-1].offset_data + (members[-1].size + 511) // 512 * 512 + 1024 + 100}[cut]
    assert at < len(data)
    Path(url).write_bytes(data[:at])
    it = iterate_samples(url, decode="bytes")
    keys = [s["key"] for s in it]
    if cut == "inside_padding":  # every member and the end-of-archive blocks are intact: nothing to report
        assert len(keys) == 4 and it.stats["skipped"] == 0
    else:
        assert keys == ["k000_000", "k000_001"]
        assert it.stats["skipped_by_reason"].get("truncated_tar") == 1, it.stats
        assert it.errors[0]["url"] == url
