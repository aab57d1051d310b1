"""Shards that are not the ones written: a shard replaced by a copy of another, a member renamed, a foreign sample
added, a JPEG with flipped scan bytes; and ``index.json`` files that point outside the shards root or are not what
``slotcon shard`` writes.

The loader checks each shard's sha256 (recorded in ``index.json``) at its first visit, before yielding anything of
it: a shard that differs yields only the samples written into it (each member's sha1 as its manifest lists), every
other sample is counted lost, nothing foreign or repeated is trained on. A corrupt JPEG that libjpeg only warns about
is a lost sample, not an image of noise.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from components.data.loading.decode import CorruptJPEGError, decode_batch, decode_rgb
from components.data.loading.loader import iterate_samples
from components.data.shards.index import expected_counts, read_index, split_urls
from components.errors import UserError

pytestmark = pytest.mark.faults

SPLIT = "train2017"


@pytest.fixture
def root(shards, tmp_path) -> Path:
    """A private copy of the tiny scene shards (4 train shards of 12 samples)."""
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    return out


def _read(root: Path):
    urls = split_urls(root, SPLIT)
    it = iterate_samples(urls, decode="bytes", expected_counts=expected_counts(root, SPLIT))
    keys = [s["key"] for s in it]
    return urls, keys, it


def _rewrite(url: str, edit) -> None:
    """Re-pack the shard's members after ``edit(list of (TarInfo, bytes))`` changed them."""
    with tarfile.open(url) as tf:
        members = [(ti, tf.extractfile(ti).read()) for ti in tf.getmembers()]
    members = edit(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for ti, data in members:
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    Path(url).write_bytes(buf.getvalue())


def test_index_records_each_shards_sha256(root):
    info = read_index(root)["splits"][SPLIT]
    assert len(info["shard_sha256"]) == len(info["shards"])
    for rel, digest in zip(info["shards"], info["shard_sha256"]):
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest


def test_intact_shards_lose_nothing(root):
    _, keys, it = _read(root)
    assert len(keys) == len(set(keys)) == sum(expected_counts(root, SPLIT).values())
    assert it.stats["lost"] == 0 and not it.errors


def test_a_shard_replaced_by_a_copy_of_another_is_counted_lost_not_read_twice(root):
    urls = split_urls(root, SPLIT)
    counts = expected_counts(root, SPLIT)
    shutil.copyfile(urls[1], urls[0])  # same count, a complete tar: only its identity tells
    _, keys, it = _read(root)
    assert len(keys) == len(set(keys)), "samples of the copied shard were read twice"
    assert len(keys) == sum(counts.values()) - counts[urls[0]]
    assert it.stats["lost"] == counts[urls[0]] and it.stats["lost_by_shard"] == {urls[0]: counts[urls[0]]}
    assert {e["reason"] for e in it.errors} == {"sha256_mismatch"}


def test_a_renamed_member_costs_its_sample_and_reaches_nobody(root):
    urls = split_urls(root, SPLIT)

    def rename(members):
        members[0][0].name = "../../x.jpg"
        return members

    _rewrite(urls[1], rename)
    _, keys, it = _read(root)
    assert it.stats["lost"] == 1 and it.stats["lost_by_shard"] == {urls[1]: 1}
    assert not any(".." in k or k.endswith("x") for k in keys)
    assert [e["reason"] for e in it.errors] == ["sha256_mismatch"]


def test_a_foreign_sample_added_to_a_shard_is_never_read(root):
    urls = split_urls(root, SPLIT)

    def add(members):
        ti, data = next((ti, d) for ti, d in members if ti.name.endswith(".jpg"))
        foreign = [(tarfile.TarInfo("zz_foreign.jpg"), data), (tarfile.TarInfo("zz_foreign.json"), b"{}")]
        return members + foreign

    _rewrite(urls[-1], add)
    _, keys, it = _read(root)
    assert "zz_foreign" not in keys
    assert it.stats["lost"] == 0  # every sample written is still there and intact
    assert [e["reason"] for e in it.errors] == ["sha256_mismatch"]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside/x.tar", "train2017/../../x.tar"])
def test_shard_paths_outside_the_root_are_one_line_errors(root, bad):
    path = root / "index.json"
    index = json.loads(path.read_text())
    index["splits"][SPLIT]["shards"][0] = bad
    path.write_text(json.dumps(index))
    with pytest.raises(UserError) as err:
        split_urls(root, SPLIT)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "inside the shards root" in msg


@pytest.mark.parametrize("text", ["{not json", "[]", '{"splits": 3}', '{"splits": {"train2017": {"shards": 5}}}',
                                  '{"splits": {"train2017": {"shards": ["train2017/a.tar"], "num_samples": 1, '
                                  '"shard_samples": ["1"]}}}'])
def test_a_malformed_index_is_one_line(root, text):
    path = root / "index.json"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        read_index(root)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "re-run `slotcon shard`" in msg


def _corrupt_jpeg() -> tuple[bytes, bytes]:
    """(a JPEG, the same JPEG with flipped bytes in its scan data) - libjpeg decodes the second with a warning."""
    from PIL import Image

    arr = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    good = buf.getvalue()
    bad = bytearray(good)
    for i in range(bad.find(b"\xff\xda") + 40, len(bad) - 10, 37):  # inside the entropy-coded data, no markers
        if bad[i] != 0xFF and bad[i - 1] != 0xFF:
            bad[i] ^= 0x55
    return good, bytes(bad)


def test_a_jpeg_with_flipped_scan_bytes_is_a_lost_sample(tmp_path, write_shards):
    good, bad = _corrupt_jpeg()
    assert decode_rgb(good).shape == (3, 64, 64)
    with pytest.raises(CorruptJPEGError):
        decode_rgb(bad)
    (url,) = write_shards(tmp_path, 1, 4)  # no index.json: only the decoder can tell

    def spoil(members):
        return [(ti, bad if ti.name == "k000_002.jpg" else data) for ti, data in members]

    _rewrite(url, spoil)
    it = iterate_samples(url, decode="rgb", expected_counts={url: 4})
    keys = [s["key"] for s in it]
    assert keys == ["k000_000", "k000_001", "k000_003"]
    assert it.stats["lost"] == 1 and it.errors[0]["reason"] == "bad_image" and it.errors[0]["key"] == "k000_002"
    # the raw-bytes path (the device decodes) drops it at the batch decode on the CPU
    out = decode_batch([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (good, bad)], torch.device("cpu"))
    assert out.kept == [0] and out.failed[0][0] == 1 and "Corrupt JPEG" in out.failed[0][1]
