"""Stage ``shard`` (components/data/shards/stage.py): round trip, byte-identical re-runs, --verify, interrupted writes."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from components.config import DataConfig, ShardConfig
from components.data.prepare.manifest import read_manifest
from components.data.prepare.stage import run_prepare
from components.data.shards.stage import plan_shards, read_index, run_shard, split_urls, verify_shards
from components.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def raw(tmp_path, write_coco):
    """A tiny COCO-layout source (with semantic maps) checked by ``prepare``: (root, raw_dir)."""
    root = write_coco(tmp_path / "scenes", n_train=14, n_val=5)
    run_prepare(DataConfig(workers=1), root, tmp_path / "raw", progress=False)
    return root, tmp_path / "raw"


def _tar_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(ti.name, tf.extractfile(ti).read()) for ti in tf]


def test_round_trip_bytes_annotations_and_manifests(raw, tmp_path, read_instances):
    root, raw_dir = raw
    out = tmp_path / "shards"
    m = run_shard(ShardConfig(max_count=4, workers=1), raw_dir, out, progress=False)
    assert m["samples"] == 19 and m["splits"]["train2017"]["shards"] == 4  # 14 = 4+4+4+2
    index = read_index(out)
    assert index["pretrain"] == ["train2017"] and index["train"] == "train2017" and index["val"] == "val2017"
    assert [c["id"] for c in index["categories"]] == [1, 2, 3] and index["semantic_classes"][1]["name"] == "disc"
    for split in ("train2017", "val2017"):
        inst = read_instances(root, split)
        anns: dict[int, list] = {}
        for a in inst["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
        by_name = {im["file_name"]: im for im in inst["images"]}
        seen = {}
        for url in split_urls(out, split):
            members = _tar_members(url)
            names = [n for n, _ in members]
            for n, data in members:
                key, ext = n.split(".", 1)
                seen.setdefault(key, {})[ext] = data
            # members of a sample are adjacent and in sorted order (jpg, json, seg.png)
            keys_in_order = list(dict.fromkeys(n.split(".")[0] for n in names))
            assert names == [f"{k}.{e}" for k in keys_in_order for e in ("jpg", "json", "seg.png")]
        assert sorted(seen) == sorted(Path(f).stem for f in by_name)
        for key, mem in seen.items():
            fname = key + ".jpg"
            assert mem["jpg"] == (root / split / fname).read_bytes()  # bytes in = bytes out, no re-encode
            meta = json.loads(mem["json"])
            assert meta["image"] == by_name[fname] and meta["annotations"] == anns.get(by_name[fname]["id"], [])
            assert mem["seg.png"] == (root / "stuffthingmaps_trainval2017" / split / f"{key}.png").read_bytes()
        # the shard manifest agrees with prepare's and with the tars
        rows, meta = read_manifest(out / split / "manifest.parquet")
        prep_rows, _ = read_manifest(raw_dir / "scenes" / split / "manifest.parquet")
        assert {r["key"]: r["sha1"] for r in rows} == {r["key"]: r["sha1"] for r in prep_rows}
        assert sum(s["num_samples"] for s in meta["shards"]) == len(rows) == index["splits"][split]["num_samples"]
        for r in rows:
            with open(out / split / r["shard"], "rb") as f:  # offset points at the sample's first header
                f.seek(r["offset"])
                assert tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape").name == f"{r['key']}.jpg"
    assert verify_shards(out, progress=False) == {"shards": 6, "samples": 19}


def test_same_input_gives_byte_identical_shards(raw, tmp_path):
    _, raw_dir = raw
    a, b = tmp_path / "a", tmp_path / "b"
    run_shard(ShardConfig(max_count=3, workers=1, verify=False), raw_dir, a, progress=False)
    run_shard(ShardConfig(max_count=3, workers=2, verify=False), raw_dir, b, progress=False)  # worker count too
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert any(str(p).endswith(".tar") for p in files_a)
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # another seed shuffles differently; the write-time shuffle is not the key order
    c = tmp_path / "c"
    run_shard(ShardConfig(max_count=3, workers=1, seed=1, verify=False), raw_dir, c, progress=False)
    order = lambda d: [n for u in split_urls(d, "train2017") for n, _ in _tar_members(u)]  # noqa: E731
    assert order(a) != order(c) and sorted(order(a)) == sorted(order(c)) and order(a) != sorted(order(a))


def test_max_bytes_cuts_shards():
    items = [{"size": s} for s in (300, 300, 300, 900, 100, 2000, 50)]
    shards = plan_shards(items, max_count=10, max_bytes=700 + 2 * 10240)
    assert [[i["size"] for i in s] for s in shards] == [[300, 300], [300], [900], [100], [2000], [50]]
    assert [len(s) for s in plan_shards(items, max_count=3, max_bytes=10**9)] == [3, 3, 1]


def test_verify_catches_damage_and_cli_exits_2(raw, tmp_path, capsys):
    from components.cli import main

    _, raw_dir = raw
    out = tmp_path / "shards"
    run_shard(ShardConfig(max_count=4, workers=1, verify=False), raw_dir, out, progress=False)
    params = tmp_path / "params.yaml"
    params.write_text("tracking:\n  enabled: false\nshard:\n  workers: 1\n")
    assert main(["shard", "--verify", "--out", str(out), "--params", str(params), "--no-progress"]) == 0
    victim = Path(split_urls(out, "train2017")[1])
    data = bytearray(victim.read_bytes())
    data[1200] ^= 0xFF  # one bit-flip inside the first JPEG
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["shard", "--verify", "--out", str(out), "--params", str(params), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and victim.name in err and "sha256" in err
    victim.unlink()
    with pytest.raises(UserError, match="shard files differ from index.json"):
        verify_shards(out, progress=False)


def test_changed_image_after_prepare_is_an_error(raw, tmp_path):
    root, raw_dir = raw
    p = sorted((root / "val2017").glob("*.jpg"))[0]
    p.write_bytes(p.read_bytes() + b"\x00")
    with pytest.raises(UserError, match="changed since `slotcon prepare`"):
        run_shard(ShardConfig(max_count=4, workers=2), raw_dir, tmp_path / "shards", progress=False)
    with pytest.raises(UserError, match="index.json: not found"):
        verify_shards(tmp_path / "shards", progress=False)
    assert not list(tmp_path.rglob("*.tar.tmp"))  # a Python-level failure cleans its temp file


def test_missing_prepare_output_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match=r"index.json: not found; run `slotcon prepare`"):
        run_shard(ShardConfig(), tmp_path / "raw", tmp_path / "shards", progress=False)
    with pytest.raises(UserError, match="the shard stage has not completed"):
        split_urls(tmp_path / "shards", "train2017")


KILL_SCRIPT = """
import os, signal, sys
from components.config import ShardConfig
from components.data.shards.stage import run_shard
calls = {"n": 0}
def on_sample(i):
    calls["n"] += 1
    if calls["n"] == 7:  # 2nd shard of 4, its 3rd sample: a real SIGKILL, no cleanup code runs
        os.kill(os.getpid(), signal.SIGKILL)
run_shard(ShardConfig(max_count=4, workers=1), sys.argv[1], sys.argv[2], progress=False, on_sample=on_sample)
"""


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow  # a fresh interpreter imports the stage (~3-5 s on a busy 2-core machine)
def test_killed_writer_resumes_to_byte_identical_shards(raw, tmp_path):
    """kill -9 mid-shard: nothing --verify accepts; the re-run keeps the finished shard (same inode: not rewritten)
    and the result is byte-identical to an uninterrupted run."""
    _, raw_dir = raw
    out = tmp_path / "shards"
    work = tmp_path / ".shards.work.tmp"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(raw_dir), str(out)], cwd=REPO, timeout=120)
    assert proc.returncode == -9
    assert not (out / "index.json").exists() and not list(out.rglob("*.tar"))
    names = sorted(p.name for p in (work / "train2017").iterdir())
    assert names == [".train2017-000001.tar.tmp", "train2017-000000.tar", "train2017-000000.tar.done.json"]
    assert len(_tar_members(work / "train2017" / "train2017-000000.tar")) == 4 * 3  # the renamed shard is complete
    inode = (work / "train2017" / "train2017-000000.tar").stat().st_ino
    with pytest.raises(UserError) as exc:
        verify_shards(out, progress=False)
    assert "not completed" in str(exc.value)
    # the re-run resumes: the finished shard is kept, the rest written; then everything is byte-identical
    m = run_shard(ShardConfig(max_count=4, workers=1), raw_dir, out, progress=False)
    assert m["shards_reused"] == 1 and m["verified_samples"] == 19
    assert (out / "train2017" / "train2017-000000.tar").stat().st_ino == inode
    assert not work.exists() and not list(out.rglob("*.tmp"))
    straight = tmp_path / "straight"
    run_shard(ShardConfig(max_count=4, workers=2), raw_dir, straight, progress=False)
    assert _tree_bytes(out) == _tree_bytes(straight)


def test_exception_mid_shard_leaves_no_complete_looking_shard(raw, tmp_path):
    _, raw_dir = raw
    out = tmp_path / "shards"
    run_shard(ShardConfig(max_count=4, workers=1), raw_dir, out, progress=False)  # a complete earlier run
    before = _tree_bytes(out)

    def boom(i, calls=[0]):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_shard(ShardConfig(max_count=4, seed=1, workers=1), raw_dir, out, progress=False, on_sample=boom)
    # the old index went first, so the old shards can't pass as complete; new work waits in the work folder
    assert not (out / "index.json").exists() and not list(out.rglob("*.tmp"))
    assert {k: v for k, v in before.items() if k != "index.json"} == _tree_bytes(out)
    work = tmp_path / ".shards.work.tmp" / "train2017"
    assert sorted(p.name for p in work.iterdir()) == ["train2017-000000.tar", "train2017-000000.tar.done.json"]
    with pytest.raises(UserError):
        verify_shards(out, progress=False)
    m = run_shard(ShardConfig(max_count=4, seed=1, workers=1), raw_dir, out, progress=False)
    assert m["shards_reused"] == 1 and m["verified_samples"] == 19


def test_shard_bytes_hash_matches_manifest_metadata(raw, tmp_path):
    _, raw_dir = raw
    out = tmp_path / "shards"
    run_shard(ShardConfig(max_count=5, workers=2, verify=False), raw_dir, out, progress=False)
    _, meta = read_manifest(out / "val2017" / "manifest.parquet")
    for s in meta["shards"]:
        data = (out / "val2017" / s["name"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
        assert "sha1" not in s  # one digest per shard: the sha256 index.json also records
        assert tarfile.open(fileobj=io.BytesIO(data)).getmembers()[0].mtime == 946684800


def test_verify_reads_a_manifest_that_records_each_shards_sha1(raw, tmp_path):
    """A manifest written before the shards carried one digest (sha256) lists each shard's sha1: --verify checks it."""
    import pyarrow.parquet as pq

    _, raw_dir = raw
    out = tmp_path / "shards"
    run_shard(ShardConfig(max_count=5, workers=1, verify=False), raw_dir, out, progress=False)
    mpath = out / "val2017" / "manifest.parquet"
    table = pq.read_table(mpath)
    _, meta = read_manifest(mpath)
    for s in meta["shards"]:
        s["sha1"] = hashlib.sha1((out / "val2017" / s["name"]).read_bytes()).hexdigest()
        del s["sha256"]
    pq.write_table(table.replace_schema_metadata({"slotcon": json.dumps(meta, sort_keys=True)}), mpath)
    assert verify_shards(out, progress=False)["samples"] == 19
    shard = out / "val2017" / meta["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # inside the first member's data: same size, other bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="size/sha1 differ"):
        verify_shards(out, progress=False)


def test_cocoplus_unlabeled_split_and_cli_metrics(tmp_path, write_coco):
    from components.cli import main

    root = write_coco(tmp_path / "coco", n_train=4, n_val=2, n_unlabeled=3, with_seg=False)
    run_prepare(DataConfig(source="cocoplus", coco_root=str(root), workers=1), "unused", tmp_path / "raw", progress=False)
    params = tmp_path / "params.yaml"
    params.write_text("tracking:\n  enabled: false\nshard:\n  workers: 1\n  max_count: 2\n")
    rc = main(["shard", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "shards"), "--metrics",
               str(tmp_path / "shard.json"), "--params", str(params), "--no-progress"])
    assert rc == 0
    m = json.loads((tmp_path / "shard.json").read_text())
    assert m["samples"] == 9 and m["splits"]["unlabeled2017"] == {"samples": 3, "shards": 2, "bytes": m["splits"]["unlabeled2017"]["bytes"]}
    assert m["img_per_s"] > 0 and m["mb_per_s"] > 0 and m["verified_samples"] == 9
    index = read_index(tmp_path / "shards")
    assert index["pretrain"] == ["train2017", "unlabeled2017"] and index["semantic_classes"] is None
    assert index["splits"]["unlabeled2017"]["labeled"] is False and index["splits"]["train2017"]["with_seg"] == 0
    for url in split_urls(tmp_path / "shards", "unlabeled2017"):
        for name, data in _tar_members(url):
            assert not name.endswith("seg.png")
            if name.endswith(".json"):
                meta = json.loads(data)
                assert meta["annotations"] == [] and meta["image"]["width"] == 64 and meta["image"]["height"] == 56
