import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data.segmentation.layouts import (
    COCOSTUFF27_CLASSES,
    CURATED_LIST,
    detect_layout,
)
from components.data.segmentation.sources import open_folder
from components.errors import UserError

H, W = 12, 16


def _img(path: Path, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), 120, np.uint8)).save(path, format=fmt)


def _lbl(path: Path, values: list[int], palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((H, W), np.uint8)
    for i, v in enumerate(values):  # vertical bands, one per value
        arr[:, i * W // len(values) : (i + 1) * W // len(values)] = v
    im = Image.fromarray(arr)  # mode L
    if palette:  # as VOC ships its labels: palette PNG whose indices are the classes
        im.putpalette([c for i in range(256) for c in (i, 255 - i, (7 * i) % 256)])
        assert im.mode == "P"
    im.save(path)


def make_scenes(root: Path) -> Path:
    for split in ("train2017", "val2017"):
        for k in ("000000000001", "000000000002"):
            _img(root / split / f"{k}.jpg")
            _lbl(root / "stuffthingmaps_trainval2017" / split / f"{k}.png", [10, 20, 255])
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "semantic_classes.json").write_text(
        json.dumps([{"id": 10, "name": "sky", "isthing": 0}, {"id": 20, "name": "cube", "isthing": 1}])
    )
    return root


def make_cocostuff(root: Path, curated: bool = False) -> Path:
    for split in ("train2017", "val2017"):
        for k in ("000000000139", "000000000285"):
            _img(root / "images" / split / f"{k}.jpg")
            _lbl(root / "annotations" / split / f"{k}.png", [0, 1, 156, 255])  # person, bicycle, sky-other
        if curated:
            (root / "curated" / split).mkdir(parents=True, exist_ok=True)
            (root / "curated" / split / CURATED_LIST).write_text("000000000285\n")
    return root


def make_voc(root: Path, aug: bool = False) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000032\n")
    (sets / "val.txt").write_text("2007_000033\n")
    for k in ("2007_000032", "2007_000033", "2008_000001"):
        _img(base / "JPEGImages" / f"{k}.jpg")
    _lbl(base / "SegmentationClass" / "2007_000032.png", [0, 15, 255], palette=True)
    _lbl(base / "SegmentationClass" / "2007_000033.png", [0, 20], palette=True)
    if aug:
        (sets / "aug.txt").write_text("2008_000001\n")
        _lbl(base / "SegmentationClassAug" / "2008_000001.png", [3])
    return root


def make_cityscapes(root: Path, train_ids: bool = True) -> Path:
    for split in ("train", "val"):
        _img(root / "leftImg8bit" / split / "aachen" / "aachen_000000_000019_leftImg8bit.png", "PNG")
        name = "aachen_000000_000019_gtFine_" + ("labelTrainIds.png" if train_ids else "labelIds.png")
        _lbl(root / "gtFine" / split / "aachen" / name, [0, 18, 255] if train_ids else [7, 33, 1])
    return root


def make_ade(root: Path) -> Path:
    base = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        _img(base / "images" / split / "ADE_val_00000001.jpg")
        _lbl(base / "annotations" / split / "ADE_val_00000001.png", [0, 1, 150])
    return root


@pytest.mark.parametrize(
    "maker,kind",
    [(make_scenes, "scenes"), (make_cocostuff, "cocostuff"), (make_voc, "voc"), (make_cityscapes, "cityscapes"),
     (make_ade, "ade20k")],
)
def test_layout_detected_for_each_kind(tmp_path, maker, kind):
    root = maker(tmp_path / kind)
    assert detect_layout(root) == kind
    src = open_folder(root, "auto", "val")
    assert src.kind == kind and len(src) >= 1
    s = next(src.iterate())
    assert s["image"].shape == (3, H, W) and s["label"].shape == (H, W)
    assert int(s["label"][s["label"] != 255].max()) < src.num_classes


def test_labels_are_mapped_to_contiguous_classes(tmp_path):
    s = next(open_folder(make_scenes(tmp_path / "s"), "auto", "val").iterate())
    assert sorted(s["label"].unique().tolist()) == [0, 1, 255]  # ids 10, 20 -> 0, 1
    coco = open_folder(make_cocostuff(tmp_path / "c"), "cocostuff", "val")
    assert coco.num_classes == 171
    assert sorted(next(coco.iterate())["label"].unique().tolist()) == [0, 1, 156 - 11, 255]  # 11 unused thing ids
    city = next(open_folder(make_cityscapes(tmp_path / "cs", train_ids=False), "auto", "val").iterate())
    assert sorted(city["label"].unique().tolist()) == [0, 18, 255]  # labelIds 7, 33 -> trainIds 0, 18; 1 ignored
    ade = next(open_folder(make_ade(tmp_path / "a"), "auto", "val").iterate())
    assert sorted(ade["label"].unique().tolist()) == [0, 149, 255]  # reduce_zero_label
    voc = next(open_folder(make_voc(tmp_path / "v"), "auto", "train").iterate())
    assert sorted(voc["label"].unique().tolist()) == [0, 15, 255]  # palette indices are the classes


def test_cocostuff27_uses_the_curated_list_and_coarse_classes(tmp_path):
    root = make_cocostuff(tmp_path / "c", curated=True)
    src = open_folder(root, "cocostuff27", "val")
    assert [k for k, _, _ in src.items] == ["000000000285"]
    assert src.class_names == COCOSTUFF27_CLASSES
    labels = sorted(next(src.iterate())["label"].unique().tolist())
    # person -> person (9), bicycle -> vehicle (11), sky-other -> sky (23)
    assert labels == [9, 11, 23, 255]
    with pytest.raises(UserError, match=CURATED_LIST):
        open_folder(make_cocostuff(tmp_path / "nocur"), "cocostuff27", "val")


def test_voc_aug_train_split(tmp_path):
    src = open_folder(make_voc(tmp_path / "v", aug=True), "voc", "train")
    assert [k for k, _, _ in src.items] == ["2007_000032", "2008_000001"]
    assert len(open_folder(tmp_path / "v", "voc", "val")) == 1


def test_wrong_layouts_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad"
    (bad / "pictures").mkdir(parents=True)
    with pytest.raises(UserError) as exc:
        detect_layout(bad)
    msg = str(exc.value)
    assert "\n" not in msg and "no known segmentation layout" in msg and str(bad) in msg
    # a known layout with a missing label file names it
    root = make_ade(tmp_path / "ade")
    (root / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000001.jpg").unlink()
    with pytest.raises(UserError, match="ADE_val_00000001.jpg is missing"):
        open_folder(root, "auto", "val")
    # asking for a kind the folder is not
    with pytest.raises(UserError, match="has the 'voc' layout"):
        open_folder(make_voc(tmp_path / "v"), "cityscapes", "val")
    # colour-coded labels are refused with the fix
    root = make_scenes(tmp_path / "rgb")
    p = root / "stuffthingmaps_trainval2017" / "val2017" / "000000000001.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(p)
    with pytest.raises(UserError, match="colour-coded"):
        next(open_folder(root, "auto", "val").iterate())


def test_shard_source_reads_seg_png_members(tmp_path, coco_shards):
    import torch

    from components.data.segmentation.sources import open_shards, open_source

    src = open_shards(coco_shards(tmp_path), "val")
    assert src.class_names == ["sky", "disc", "square", "bar"] and len(src) == 2
    samples = list(src.iterate())
    assert len(samples) == 2 and all(s["label"].shape == s["image"].shape[1:] for s in samples)
    assert set(torch.cat([s["label"].flatten() for s in samples]).tolist()) <= {0, 1, 2, 3}
    train = open_source("", tmp_path / "shards", "auto", "train")
    batch = next(iter(train.epoch_batches(0, batch_size=2, map_fn=lambda s: s, collate_fn=list, seed=0)))
    assert len(batch) == 2 and {"key", "image", "label"} <= set(batch[0])


def test_shards_without_semantic_maps_are_a_one_line_error(tmp_path, coco_shards):
    from components.data.segmentation.sources import open_shards

    with pytest.raises(UserError, match="carry no semantic maps; set data_root") as exc:
        open_shards(coco_shards(tmp_path, with_seg=False), "val")
    assert "\n" not in str(exc.value)
