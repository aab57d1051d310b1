"""Stage ``prepare`` (components/data/prepare/coco.py): discovery, checks, skip+count of bad files, one-line source errors."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from components.config import DataConfig
from components.data.prepare.coco import coco_stuff_classes
from components.data.prepare.manifest import read_manifest, resolve_root
from components.data.prepare.stage import run_prepare
from components.errors import UserError


def _params(tmp_path, **data) -> str:
    p = tmp_path / "params.yaml"
    lines = ["tracking:\n  enabled: false\n", "data:\n"] + [f"  {k}: {json.dumps(v)}\n" for k, v in data.items()]
    p.write_text("".join(lines))
    return str(p)


def test_manifest_rows_hashes_counts_and_index(tmp_path, read_instances, write_coco):
    root = write_coco(tmp_path / "scenes", n_train=10, n_val=4)
    metrics = run_prepare(DataConfig(workers=1), root, tmp_path / "raw", progress=False)
    assert metrics["images"] == 14 and metrics["skipped"] == 0
    for split, n in (("train2017", 10), ("val2017", 4)):
        rows, meta = read_manifest(tmp_path / "raw" / "scenes" / split / "manifest.parquet")
        assert len(rows) == n and meta["failures"] == [] and meta["labeled"] is True
        assert [r["key"] for r in rows] == sorted(r["key"] for r in rows)
        inst = read_instances(root, split)
        per_image = {im["id"]: 0 for im in inst["images"]}
        for a in inst["annotations"]:
            per_image[a["image_id"]] += 1
        for r in rows:
            data = (root / split / r["file_name"]).read_bytes()
            assert r["sha1"] == hashlib.sha1(data).hexdigest() and r["bytes"] == len(data)
            assert r["num_annotations"] == per_image[r["id"]] and r["mode"] == "RGB"
            assert r["key"] == r["file_name"].removesuffix(".jpg")
            assert r["seg_file"] == f"stuffthingmaps_trainval2017/{split}/{r['key']}.png"
        assert metrics["splits"][split]["annotations"] == len(inst["annotations"])
    index = json.loads((tmp_path / "raw" / "index.json").read_text())
    assert index["pretrain"] == ["train2017"] and resolve_root(tmp_path / "raw", index) == root
    assert [c["id"] for c in index["categories"]] == [1, 2, 3]
    assert index["semantic_classes"][0] == {"id": 0, "name": "sky", "isthing": False}


def test_bad_files_are_skipped_listed_and_counted(tmp_path, jpeg_bytes, png_bytes, read_instances, write_coco,
                                                  write_instances):
    root = write_coco(tmp_path / "coco", n_train=10, n_val=3)
    rng = np.random.default_rng(1)
    tr = root / "train2017"
    inst = read_instances(root, "train2017")
    recs = {im["file_name"]: im for im in inst["images"]}
    names = sorted(recs)
    good = (tr / names[0]).read_bytes()
    (tr / names[1]).write_bytes(good[: len(good) // 2])  # truncated
    (tr / names[2]).write_bytes(b"")  # zero bytes
    arr = rng.integers(0, 255, (recs[names[3]]["height"], recs[names[3]]["width"], 3), dtype=np.uint8)
    (tr / names[3]).write_bytes(png_bytes(arr))  # a PNG named .jpg
    gray_hw = (recs[names[4]]["height"], recs[names[4]]["width"])
    (tr / names[4]).write_bytes(jpeg_bytes(rng.integers(0, 255, gray_hw, dtype=np.uint8)))  # grayscale: kept
    cmyk_hw = (recs[names[5]]["height"], recs[names[5]]["width"], 3)
    (tr / names[5]).write_bytes(jpeg_bytes(rng.integers(0, 255, cmyk_hw, dtype=np.uint8), mode="CMYK"))  # kept
    (tr / names[6]).unlink()  # the annotations name an image that doesn't exist
    inst["images"].append(dict(inst["images"][7], file_name="000000999999.jpg"))  # duplicate id (7's)
    shutil.copy(tr / names[8], tr / "000000999999.jpg")
    inst["annotations"].append(dict(inst["annotations"][0], id=99999, image_id=424242))  # image not in the JSON
    write_instances(root, "train2017", inst)
    (tr / "000000777777.jpg").write_bytes(good)  # on disk, not in the annotations: not part of the split

    out = tmp_path / "raw"
    metrics = run_prepare(DataConfig(source="coco", coco_root=str(root), workers=2), "unused", out, progress=False)
    split = metrics["splits"]["train2017"]
    assert split["skipped_by_reason"] == {
        "duplicate_id": 1, "empty": 1, "missing_file": 1, "not_jpeg": 1, "truncated": 1,
    }, split
    assert split["images"] == 10 - 4 and split["skipped"] == 5
    assert split["orphan_annotations"] == 1 and split["unlisted_files"] == 1
    rows, meta = read_manifest(out / "coco" / "train2017" / "manifest.parquet")
    listed = {(f["file"], f["reason"]) for f in meta["failures"]}
    assert {(names[1], "truncated"), (names[2], "empty"), (names[3], "not_jpeg"), (names[6], "missing_file"),
            ("000000999999.jpg", "duplicate_id")} == listed
    assert all(f["detail"] for f in meta["failures"])
    assert meta["counts"]["skipped_by_reason"] == split["skipped_by_reason"]
    modes = {r["file_name"]: r["mode"] for r in rows}
    assert modes[names[4]] == "L" and modes[names[5]] == "CMYK"
    assert metrics["splits"]["val2017"]["skipped"] == 0


def test_size_mismatch_and_bad_seg(tmp_path, png_bytes, read_instances, write_coco, write_instances):
    root = write_coco(tmp_path / "s", n_train=4, n_val=2)
    inst = read_instances(root, "train2017")
    inst["images"][0]["width"] += 5  # record disagrees with the pixels: boxes/masks would be wrong
    write_instances(root, "train2017", inst)
    seg = root / "stuffthingmaps_trainval2017" / "train2017" / inst["images"][1]["file_name"].replace(".jpg", ".png")
    seg.write_bytes(png_bytes(np.zeros((10, 10, 3), np.uint8)))  # RGB, wrong size: the map is dropped, image kept
    m = run_prepare(DataConfig(workers=1), root, tmp_path / "raw", progress=False)
    s = m["splits"]["train2017"]
    assert s["skipped_by_reason"] == {"size_mismatch": 1} and s["bad_seg"] == 1 and s["images"] == 3
    rows, _ = read_manifest(tmp_path / "raw" / "scenes" / "train2017" / "manifest.parquet")
    assert {r["id"]: r["seg_file"] for r in rows}[inst["images"][1]["id"]] is None


@pytest.mark.parametrize(
    "breakage,needle",
    [
        ("no_val_json", "annotations/instances_val2017.json not found; COCO ships it in annotations_trainval2017.zip"),
        ("no_train_dir", "train2017/ not found; COCO ships it in train2017.zip"),
        ("no_root", "folder not found"),
        ("bad_json", "instances_train2017.json: not readable as JSON"),
        ("not_instances", "not a COCO instances file"),
        ("no_unlabeled", "unlabeled2017/ not found; COCO ships it in unlabeled2017.zip"),
    ],
)
def test_unusable_source_is_one_line_error(tmp_path, breakage, needle, write_coco):
    root = write_coco(tmp_path / "coco", n_train=3, n_val=2, with_seg=False)
    source = "cocoplus" if breakage == "no_unlabeled" else "coco"
    if breakage == "no_val_json":
        (root / "annotations" / "instances_val2017.json").unlink()
    elif breakage == "no_train_dir":
        shutil.rmtree(root / "train2017")
    elif breakage == "no_root":
        root = tmp_path / "nowhere"
    elif breakage == "bad_json":
        (root / "annotations" / "instances_train2017.json").write_text("{not json")
    elif breakage == "not_instances":
        (root / "annotations" / "instances_train2017.json").write_text('{"images": 3}')
    with pytest.raises(UserError) as exc:
        run_prepare(DataConfig(source=source, coco_root=str(root)), "unused", tmp_path / "raw", progress=False)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg, msg
    assert not (tmp_path / "raw" / "index.json").exists()


def test_cli_missing_annotations_exit_2_one_line(tmp_path, capsys, write_coco):
    from components.cli import main

    root = write_coco(tmp_path / "scenes", n_train=3, n_val=2)
    (root / "annotations" / "instances_train2017.json").unlink()
    params = _params(tmp_path, workers=1)
    rc = main(["prepare", "--params", params, "--scenes", str(root), "--out", str(tmp_path / "raw"),
               "--metrics", str(tmp_path / "m.json"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "annotations/instances_train2017.json not found" in err and "slotcon scenes" in err


def test_cli_writes_metrics_and_relative_root(tmp_path, monkeypatch, write_coco):
    from components.cli import main

    write_coco(tmp_path / "data" / "scenes", n_train=3, n_val=2)
    monkeypatch.chdir(tmp_path)  # as DVC runs it: relative paths from the repository root
    rc = main(["prepare", "--params", _params(tmp_path, workers=1), "--scenes", "data/scenes", "--out", "data/raw",
               "--metrics", "metrics/prepare.json", "--no-progress"])
    assert rc == 0
    m = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    assert m["images"] == 5 and m["splits"]["val2017"]["images"] == 2
    index = json.loads((tmp_path / "data" / "raw" / "index.json").read_text())
    assert index["root"] == "../scenes"  # relative to data/raw: the DVC output doesn't depend on the checkout path


def test_cocoplus_adds_unlabeled_and_cocostuff_classes(tmp_path, write_coco):
    root = write_coco(tmp_path / "coco", n_train=4, n_val=2, n_unlabeled=3)
    (root / "annotations" / "semantic_classes.json").unlink()  # real COCO: classes come from COCO-Stuff's maps
    (root / "unlabeled2017" / "000000999998.jpg").write_bytes(b"\x89PNG not really")
    m = run_prepare(DataConfig(source="cocoplus", coco_root=str(root), workers=1), "x", tmp_path / "raw", progress=False)
    assert m["splits"]["unlabeled2017"]["images"] == 3
    assert m["splits"]["unlabeled2017"]["skipped_by_reason"] == {"not_jpeg": 1}
    rows, meta = read_manifest(tmp_path / "raw" / "cocoplus" / "unlabeled2017" / "manifest.parquet")
    assert meta["labeled"] is False and all(r["num_annotations"] == 0 and r["seg_file"] is None for r in rows)
    assert {r["id"] for r in rows} == {500000, 500001, 500002}  # COCO file names are the ids
    index = json.loads((tmp_path / "raw" / "index.json").read_text())
    assert index["pretrain"] == ["train2017", "unlabeled2017"] and index["root"] == str(root)
    assert index["splits"]["unlabeled2017"]["annotations"] is None
    assert index["semantic_classes"] == coco_stuff_classes()
    assert len(index["semantic_classes"]) == 182 and index["semantic_classes"][181]["name"] == "wood"
    assert sum(c["isthing"] for c in index["semantic_classes"]) == 91
