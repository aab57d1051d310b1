"""``prepare`` for image trees (components/data/prepare/sources.py, images.py, prepare_tree.py): ImageNet and folder sources,
exact skip counts by reason on a messy folder, labels, duplicates, the non-JPEG policy, EXIF orientation, resume."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from components.config import ConfigError, DataConfig, parse_section
from components.data.prepare.manifest import read_manifest
from components.data.prepare.stage import run_prepare
from components.data.prepare.images import probe_image, transcode
from components.data.prepare.sources import glob_regex
from components.errors import UserError


def folder_cfg(root, **kw) -> DataConfig:
    return DataConfig(**{"source": "folder", "root": str(root), "exclude": ["**/thumbs/**"], "workers": 1, **kw})


@pytest.fixture(scope="module")
def messy(tmp_path_factory, write_messy_folder):
    root = write_messy_folder(tmp_path_factory.mktemp("messy") / "photos")
    out = root.parent / "raw"
    metrics = run_prepare(folder_cfg(root, workers=2), "unused", out, progress=False)
    return root, out, metrics


def test_globs():
    match = lambda p, s: bool(glob_regex(p).match(s))  # noqa: E731
    assert match("**", "a/b/c.jpg") and match("**/*.jpg", "c.jpg") and match("**/*.jpg", "a/b/c.jpg")
    assert not match("*.jpg", "a/c.jpg") and match("a/*/c.jpg", "a/b/c.jpg") and not match("a/*/c.jpg", "a/b/x/c.jpg")
    assert match("**/thumbs/**", "x/thumbs/t.jpg") and match("**/thumbs/**", "thumbs/t.jpg")
    assert not match("**/thumbs/**", "thumbsup/t.jpg")
    assert match("train/n01*/**", "train/n01440764/a.JPEG") and not match("train/n01*/**", "train/n02/a.JPEG")
    assert match("img_[0-4].png", "img_3.png") and not match("img_[!0-4].png", "img_3.png") and match("?.png", "a.png")


def test_messy_folder_exact_counts_by_reason(messy, messy_outcome):
    root, out, m = messy
    split = m["splits"]["train"]
    assert split["skipped_by_reason"] == messy_outcome.skips
    assert split["images"] == messy_outcome.ok and m["images"] == messy_outcome.ok
    assert m["skipped"] == sum(messy_outcome.skips.values())
    assert split["excluded"] == messy_outcome.excluded
    assert split["transcode"] == messy_outcome.transcode == m["transcode"]
    rows, meta = read_manifest(out / "folder" / "train" / "manifest.parquet")
    assert meta["counts"]["skipped_by_reason"] == messy_outcome.skips
    listed = {(f["file"], f["reason"]) for f in meta["failures"]}
    for item in [("bad/truncated.jpg", "truncated"), ("bad/empty.jpg", "empty"), ("loop/", "symlink_loop"),
                 ("a/b/up/", "symlink_loop"), ("linked_a/", "linked_dir_seen"), ("pipe.jpg", "not_regular"),
                 ("dup/copy_of_img_000.jpg", "duplicate"), ("link_to_img.jpg", "duplicate"),
                 ("pngs/rgba.png", "duplicate"), (".cache", "hidden"), ("notes.txt", "not_image")]:
        assert item in listed, item
    dup = next(f for f in meta["failures"] if f["file"] == "pngs/rgba.png")
    assert dup["detail"] == "same as dup/copy2.png"  # the first in walk order is kept
    by_name = {r["file_name"]: r for r in rows}
    assert "ünïcödé/日本語 画像.jpg" in by_name and "a/b/c/d/e/f/deep.jpeg" in by_name
    assert by_name["photos/rotated_6.jpg"]["width"] == 32 and by_name["photos/rotated_6.jpg"]["height"] == 48
    assert by_name["photos/rotated_6.jpg"]["orientation"] == 6 and by_name["photos/rotated_6.jpg"]["transcode"]
    assert not by_name["photos/upright_1.jpg"]["transcode"] and not by_name["misc/gray.jpg"]["transcode"]
    assert by_name["misc/cmyk.jpg"]["transcode"] and by_name["bad/png_named.jpg"]["format"] == "PNG"
    assert by_name["pngs/gray16.png"]["mode"].startswith("I")
    keys = [r["key"] for r in rows]
    assert len(set(keys)) == len(keys) and all(k.isascii() and "." not in k and len(k) <= 80 for k in keys)
    assert len({r["id"] for r in rows}) == len(rows) and all(0 <= r["id"] < 2**63 for r in rows)
    for r in rows:
        assert r["sha1"] == __import__("hashlib").sha1((root / r["file_name"]).read_bytes()).hexdigest()
    index = json.loads((out / "index.json").read_text())
    assert index["source"] == "folder" and index["pretrain"] == ["train"] and index["val"] is None
    assert index["splits"]["train"]["image_dir"] == "" and index["image_policy"]["non_jpeg"] == "transcode"
    assert not (root.parent / ".raw.work.tmp").exists()  # parts and lock are gone after a complete run


def test_non_jpeg_skip_and_keep_duplicates(messy, tmp_path, messy_outcome):
    root, _, _ = messy
    m = run_prepare(folder_cfg(root, non_jpeg="skip", duplicates="keep"), "unused", tmp_path / "raw", progress=False)
    split = m["splits"]["train"]
    skips = {k: v for k, v in messy_outcome.skips.items() if k not in ("duplicate", "decode_error")}
    assert split["skipped_by_reason"] == {**skips, "not_jpeg": 8}  # 4 PNGs, WebP, BMP, a PNG named .jpg, a bad PNG
    assert split["images"] == 13 and split["duplicates_kept"] == 2 and split["transcode"] == 3  # rotated x2 + CMYK
    _, meta = read_manifest(tmp_path / "raw" / "folder" / "train" / "manifest.parquet")
    kept = [f for f in meta["failures"] if f.get("image_kept")]
    assert sorted(f["file"] for f in kept) == ["dup/copy_of_img_000.jpg", "link_to_img.jpg"]


def test_imagenet_layout_labels_and_cross_split_duplicates(tmp_path, write_imagenet):
    root = write_imagenet(tmp_path / "imagenet")
    m = run_prepare(DataConfig(source="imagenet", root=str(root), workers=1), "unused", tmp_path / "raw",
                    progress=False)
    assert m["splits"]["train"]["images"] == 12 and m["splits"]["train"]["skipped_by_reason"] == {"no_class": 1}
    assert m["splits"]["train"]["transcode"] == 2  # the PNG named .JPEG and the CMYK JPEG, as in the real set
    assert m["splits"]["val"]["images"] == 5 and m["splits"]["val"]["labeled_images"] == 4
    assert m["splits"]["val"]["same_bytes_as_earlier_split"] == 1
    index = json.loads((tmp_path / "raw" / "index.json").read_text())
    assert [c["wnid"] for c in index["classes"]] == ["n01440764", "n01441764", "n01442764"]
    assert index["classes"][1]["name"] == "class 1, a name" and index["pretrain"] == ["train"]
    assert (index["train"], index["val"], index["notes"]["val_labels"]) == ("train", "val", "LOC_val_solution.csv")
    train, _ = read_manifest(tmp_path / "raw" / "imagenet" / "train" / "manifest.parquet")
    assert {r["key"]: r["label"] for r in train}["n01442764_3"] == 2
    assert all(r["label_name"] == r["file_name"].split("/")[1] for r in train)
    val, meta = read_manifest(tmp_path / "raw" / "imagenet" / "val" / "manifest.parquet")
    assert [r["label"] for r in val] == [1, 2, 0, 1, None]  # LOC_val_solution.csv; the last image has no row there
    assert meta["same_bytes_as_earlier_split"] == ["val/ILSVRC2012_val_00000001.JPEG"]


def test_imagenet_val_in_class_folders(tmp_path, write_imagenet):
    root = write_imagenet(tmp_path / "imagenet", val_folders=True)
    (root / "LOC_val_solution.csv").unlink()
    run_prepare(DataConfig(source="imagenet", root=str(root), workers=1), "unused", tmp_path / "raw", progress=False)
    val, _ = read_manifest(tmp_path / "raw" / "imagenet" / "val" / "manifest.parquet")
    got = {r["key"][-1]: (r["label"], r["label_name"]) for r in val}  # walk order: by class folder
    assert got == {"1": (1, "n01441764"), "2": (2, "n01442764"), "3": (0, "n01440764"), "4": (1, "n01441764"),
                   "5": (None, "n99999999")}
    assert json.loads((tmp_path / "raw" / "index.json").read_text())["notes"]["val_layout"] == "class folders"


def test_imagenet_kaggle_layout_and_class_subset(tmp_path, write_imagenet):
    root = write_imagenet(tmp_path / "kaggle", kaggle=True)
    cfg = DataConfig(source="imagenet", root=str(root), include=["train/n01440764/**", "val/**"], workers=1)
    m = run_prepare(cfg, "unused", tmp_path / "raw", progress=False)
    assert m["splits"]["train"]["images"] == 4 and m["splits"]["train"]["excluded"] == 9  # 2 classes + the stray
    index = json.loads((tmp_path / "raw" / "index.json").read_text())
    assert index["splits"]["train"]["image_dir"] == "ILSVRC/Data/CLS-LOC"


@pytest.mark.parametrize("make, needle", [
    (lambda p: p, "folder not found"),
    (lambda p: (p.mkdir(), p)[1], "no train/ folder"),
    (lambda p: ((p / "train").mkdir(parents=True), p)[1], "no class folders"),
])
def test_imagenet_layout_errors_are_one_line(tmp_path, make, needle):
    root = make(tmp_path / "imagenet")
    with pytest.raises(UserError, match=needle) as exc:
        run_prepare(DataConfig(source="imagenet", root=str(root)), "unused", tmp_path / "raw", progress=False)
    assert "\n" not in str(exc.value)


def test_folder_of_only_bad_files_and_config_errors(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"none of the 1 files of split train is a usable image \(\{'empty': 1\}\)"):
        run_prepare(folder_cfg(tmp_path / "junk"), "unused", tmp_path / "raw", progress=False)
    with pytest.raises(ConfigError, match="needs data.root"):
        parse_section("data", {"source": "folder"})
    with pytest.raises(ConfigError, match="must be a non-empty glob relative"):
        parse_section("data", {"source": "folder", "root": "x", "exclude": ["/abs/**"]})
    with pytest.raises(ConfigError, match="non_jpeg"):
        parse_section("data", {"source": "folder", "root": "x", "non_jpeg": "keep"})


def test_exif_orientation_is_baked_into_pixels(exif_jpeg, picture):
    stored = picture(5, 48, 32)  # marker top-left as stored; orientation 6 shows it rotated 90 degrees clockwise
    data = exif_jpeg(stored, 6)
    res = probe_image_bytes(data)
    assert (res["width"], res["height"], res["orientation"], res["transcode"]) == (32, 48, 6, True)
    out = transcode(data, 95)
    with Image.open(io.BytesIO(out)) as im:
        assert im.format == "JPEG" and im.size == (32, 48) and im.getexif().get(0x0112) is None
        got = np.asarray(im.convert("RGB")).astype(int)
    with Image.open(io.BytesIO(data)) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB")).astype(int)
    assert np.abs(got - want).mean() < 3.0  # one q95 4:4:4 generation
    assert got[:6, -6:].mean() > 240  # the marker moved to the top-right corner, as a viewer shows it


def probe_image_bytes(data: bytes, **kw):
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".jpg") as f:
        f.write(data)
        f.flush()
        return probe_image(f.name, **kw)


def test_transcode_handles_alpha_16bit_palette():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 4:, 3] = 255  # left half transparent -> white, right half opaque red
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, "PNG")
    with Image.open(io.BytesIO(transcode(buf.getvalue(), 100))) as im:
        px = np.asarray(im.convert("RGB")).astype(int)
    assert px[:, :3].min() > 245 and abs(px[:, 5:, 0].mean() - 200) < 4 and px[:, 5:, 1].mean() < 8
    g16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    buf = io.BytesIO()
    Image.fromarray(g16).save(buf, "PNG")
    with Image.open(io.BytesIO(transcode(buf.getvalue(), 100))) as im:
        assert im.mode == "L"
        assert np.abs(np.asarray(im).astype(float) - g16 / 257.0).max() < 3
