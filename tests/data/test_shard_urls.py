"""Shard roots given as fsspec URLs (``memory://``: no server): index.json read through fsspec, shard URLs joined with
``/``, per-shard counts keyed by those URLs, containment of index entries, one-line errors naming the URL, the
``shard.url`` resolver and the error for a protocol whose driver is missing."""
from __future__ import annotations

import importlib
import io
import json
import re
import sys
import tarfile
import uuid

import fsspec
import pytest
from PIL import Image

from components.config import ShardConfig
from components.config.params_file import render
from components.data.loading.loader import iterate_samples
from components.data.shards.index import (
    expected_counts, join_root, read_index, shard_identity, shards_root, split_urls, url_fs,
)
from components.errors import UserError


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(keys: list[str]) -> bytes:
    jpg = _jpeg()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for k in keys:
            for ext, payload in (("jpg", jpg), ("json", json.dumps({"k": k}).encode())):
                ti = tarfile.TarInfo(f"{k}.{ext}")
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


def _index(shards: list[str], counts: list[int]) -> dict:
    return {"splits": {"train": {"shards": shards, "num_samples": sum(counts), "shard_samples": counts}},
            "pretrain": ["train"]}


@pytest.fixture
def root():
    """An empty ``memory://`` root of this test (memory is shared by the process: one prefix per test)."""
    url = f"memory://shard-urls/{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    yield url
    if fs.exists(url):
        fs.rm(url, recursive=True)


def _put(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb") as f:
        f.write(data)


def test_join_keeps_the_scheme_and_local_paths_stay_paths(tmp_path):
    assert join_root("s3://bucket/prefix/", "train/train-000000.tar") == "s3://bucket/prefix/train/train-000000.tar"
    assert join_root("file:///abs/shards", "index.json") == "file:///abs/shards/index.json"
    assert join_root(tmp_path, "index.json") == str(tmp_path / "index.json")


def test_index_split_urls_and_counts_read_through_fsspec(root):
    _put(f"{root}/index.json", json.dumps(_index(["train/a.tar", "train/b.tar"], [2, 1])).encode())
    _put(f"{root}/train/a.tar", _tar(["k0", "k1"]))
    _put(f"{root}/train/b.tar", _tar(["k2"]))
    assert read_index(root)["pretrain"] == ["train"]
    urls = split_urls(root, "train")
    assert urls == [f"{root}/train/a.tar", f"{root}/train/b.tar"]
    assert expected_counts(root, "train") == dict(zip(urls, [2, 1]))
    it = iterate_samples(urls, decode="bytes", expected_counts=expected_counts(root, "train"))
    assert sorted(s["__key__"] for s in it) == ["k0", "k1", "k2"]
    assert it.stats["lost"] == 0


def test_missing_shard_under_an_url_root_is_counted_lost(root):
    _put(f"{root}/index.json", json.dumps(_index(["train/a.tar", "train/b.tar"], [2, 1])).encode())
    _put(f"{root}/train/a.tar", _tar(["k0", "k1"]))
    it = iterate_samples(split_urls(root, "train"), decode="bytes", expected_counts=expected_counts(root, "train"))
    assert len(list(it)) == 2 and it.stats["lost"] == 1


def test_missing_index_names_the_url(root):
    with pytest.raises(UserError, match=rf"^{re.escape(root)}/index.json: not found.*slotcon shard"):
        read_index(root)


@pytest.mark.parametrize("entry", ["../evil.tar", "/abs/evil.tar", "s3://other/evil.tar", "train/../../x.tar"])
def test_index_entries_outside_an_url_root_are_refused(root, entry):
    _put(f"{root}/index.json", json.dumps(_index([entry], [1])).encode())
    with pytest.raises(UserError, match=rf"^{re.escape(root)}/index.json: .*must stay inside the shards root"):
        split_urls(root, "train")


def test_bad_json_and_unknown_split_name_the_url(root):
    _put(f"{root}/index.json", b"{not json")
    with pytest.raises(UserError, match=rf"^{re.escape(root)}/index.json: not valid JSON"):
        read_index(root)
    _put(f"{root}/index.json", json.dumps(_index(["train/a.tar"], [1])).encode())
    with pytest.raises(UserError, match=rf"^{re.escape(root)}/index.json: no split 'val'"):
        expected_counts(root, "val")


def test_shard_identity_of_an_url_shard(root):
    index = _index(["train/a.tar"], [2])
    index["splits"]["train"]["shard_sha256"] = ["ab" * 32]
    _put(f"{root}/index.json", json.dumps(index).encode())
    assert shard_identity(f"{root}/train/a.tar") == ("ab" * 32, 2)
    assert shard_identity(f"{root}/train/other.tar") is None
    index["splits"]["train"]["shard_sha256"] = ["cd" * 32]  # re-sharded: a new index at the same root
    index["splits"]["train"]["shard_samples"] = [3]
    _put(f"{root}/index.json", json.dumps(index).encode())
    assert shard_identity(f"{root}/train/a.tar") == ("cd" * 32, 3)


def test_missing_driver_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs raises ImportError, as when it is not installed
    monkeypatch.delitem(importlib.import_module("fsspec.registry")._registry, "s3", raising=False)
    with pytest.raises(UserError, match=r"^s3://bucket/p/index.json: reading s3:// URLs needs .*pip install -e "
                                        r"'\.\[stack\]'$"):
        read_index("s3://bucket/p")
    with pytest.raises(UserError, match="pip install"):
        url_fs("s3://bucket/p")


def test_shards_root_reads_shard_url_for_the_default_root_only(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(render())
    assert shards_root("data/shards", params) == "data/shards"
    params.write_text(render().replace('  url: ""', "  url: s3://bucket/team/shards"))
    assert shards_root("data/shards", params) == "s3://bucket/team/shards"
    assert shards_root("./data/shards", params) == "s3://bucket/team/shards"
    assert shards_root("elsewhere/shards", params) == "elsewhere/shards"
    assert shards_root("memory://x", params) == "memory://x"


@pytest.mark.parametrize("url", ["data/shards", "s3://", "s3:///"])
def test_shard_url_must_be_an_url_with_a_folder(url):
    with pytest.raises(ValueError, match="must be an fsspec URL"):
        ShardConfig(url=url)
