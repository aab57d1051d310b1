"""Semantic-segmentation dataset kinds on disk: recognising a folder's layout, pairing each split's images with their
label maps, the class tables, and the 256-entry lookup tables that turn each kind's label values into contiguous class
indices ``0..C-1`` (255 = ignore). Every check is cheap (folders, lists, pairing) and happens before any decoding; a
wrong layout is a one-line :class:`~components.errors.UserError` naming the folder, what is missing and the fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from components.constants import IGNORE_INDEX as IGNORE
from components.data.prepare.coco import COCO_STUFF_NAMES
from components.errors import UserError

KINDS = ("scenes", "cocostuff", "cocostuff27", "voc", "cityscapes", "ade20k")
_IMG_EXT = (".jpg", ".jpeg", ".png")

# ---------------------------------------------------------------------------------------------------------------------
# class tables
# ---------------------------------------------------------------------------------------------------------------------
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]
# cityscapesScripts labels.py: labelId -> trainId for the 19 evaluated classes; every other id is ignored.
CITYSCAPES_ID_TO_TRAINID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock",
    "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers",
    "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway",
    "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass", "clock", "flag",
]
# COCO-Stuff fine labels 0..181 (= COCO id - 1); None marks the 11 thing ids COCO 2017 never annotates.
_COCO_THINGS = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", None, "backpack", "umbrella", None, None, "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana",
    "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", None, "dining table", None, None, "toilet", None, "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", None, "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush", None,
]
_COCO_STUFF = COCO_STUFF_NAMES[91:]  # the 91 stuff classes (ids 91..181), as `prepare` names them

COCOSTUFF_FINE = _COCO_THINGS + _COCO_STUFF  # 182 entries
COCOSTUFF_CLASSES = [n for n in COCOSTUFF_FINE if n is not None]  # 171, mmseg's COCOStuffDataset order
# PiCIE (Cho et al. 2021) fine -> coarse table, as used by SlotCon §4 / STEGO for COCO-Stuff-27.
COCOSTUFF27_CLASSES = [
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor", "person",
    "sports", "vehicle", "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
]
_FINE_TO_COARSE27 = (
    [9] + [11] * 8 + [8] * 6 + [7] * 10 + [6] * 8 + [10] * 10 + [5] * 8 + [2] * 10 + [3] * 10 + [0] * 6 + [1] * 6
    + [4] * 8
    + [17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22,
       26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21,
       26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18,
       18, 18, 26, 26, 19, 19, 24]
)
CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"
assert len(COCOSTUFF_FINE) == 182 and len(COCOSTUFF_CLASSES) == 171 and len(_FINE_TO_COARSE27) == 182
assert len(ADE20K_CLASSES) == 150


def _lut(pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """A (256,) uint8 table: raw label value -> contiguous class (255 for everything not listed)."""
    t = np.full(256, IGNORE, dtype=np.uint8)
    for raw, cls in pairs:
        t[raw] = cls
    return t


def cocostuff_lut(coarse27: bool, train_ids: bool) -> np.ndarray:
    """Raw COCO-Stuff label (fine 0..181, or mmseg's 171 trainIds) -> 171 classes, or the 27 coarse ones."""
    fine_used = [i for i, n in enumerate(COCOSTUFF_FINE) if n is not None]  # trainId t <-> fine id fine_used[t]
    if train_ids:
        return _lut((t, _FINE_TO_COARSE27[f] if coarse27 else t) for t, f in enumerate(fine_used))
    if coarse27:
        return _lut(enumerate(_FINE_TO_COARSE27))
    return _lut((f, t) for t, f in enumerate(fine_used))


def semantic_lut(semantic_classes: list[dict], where: str) -> tuple[list[str], np.ndarray]:
    """``[{"id", "name", ...}]`` -> (names in list order, LUT id -> list position)."""
    if not semantic_classes:
        raise UserError(f"{where}: no semantic classes listed; regenerate the dataset (scenes) or give a data_root")
    ids = [int(c["id"]) for c in semantic_classes]
    if len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= IGNORE:
        raise UserError(f"{where}: semantic class ids {ids} must be unique and in 0..254")
    return [str(c["name"]) for c in semantic_classes], _lut((i, n) for n, i in enumerate(ids))


# ---------------------------------------------------------------------------------------------------------------------
# layout detection
# ---------------------------------------------------------------------------------------------------------------------
def _voc_base(root: Path) -> Path | None:
    for base in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (base / "JPEGImages").is_dir() and (base / "ImageSets" / "Segmentation").is_dir():
            return base
    return None


def _ade_base(root: Path) -> Path | None:
    for base in (root, root / "ADEChallengeData2016"):
        if (base / "images" / "training").is_dir() or (base / "images" / "validation").is_dir():
            return base
    return None


def _coco_dirs(root: Path, split: str) -> tuple[Path, Path] | None:
    """(image dir, label dir) of a COCO-Stuff-like split, or None."""
    s = f"{split}2017"
    for lbl in (root / "stuffthingmaps_trainval2017" / s, root / "annotations" / s):
        if lbl.is_dir():
            for img in (root / s, root / "images" / s):
                if img.is_dir():
                    return img, lbl
    return None


def detect_layout(root: str | Path) -> str:
    """The dataset kind of ``root`` from its folders (the layouts: see :func:`find_split`); one-line UserError
    otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data_root is not a folder; give the dataset's root folder (or leave it empty)")
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if _voc_base(root) is not None:
        return "voc"
    if _ade_base(root) is not None and (_ade_base(root) / "annotations").is_dir():
        return "ade20k"
    if _coco_dirs(root, "val") or _coco_dirs(root, "train"):
        if (root / "annotations" / "semantic_classes.json").is_file():
            return "scenes"
        return "cocostuff"
    found = sorted(p.name for p in root.iterdir())[:8]
    raise UserError(
        f"{root}: no known segmentation layout (found {found}); expected one of: scenes/COCO-Stuff "
        "(val2017/ + stuffthingmaps_trainval2017/val2017/), VOC2012 (JPEGImages/ + ImageSets/Segmentation/), "
        "Cityscapes (leftImg8bit/ + gtFine/), ADE20K (images/validation/ + annotations/validation/)"
    )


def _pairs(img_dir: Path, lbl_dir: Path, keys: list[str], lbl_suffix: str, where: Path) -> list[tuple[str, Path, Path]]:
    """Pair ``key`` -> image (any known extension) and label; a missing file is a one-line error naming it."""
    items = []
    for k in keys:
        lbl = lbl_dir / f"{k}{lbl_suffix}"
        img = next((img_dir / f"{k}{e}" for e in _IMG_EXT if (img_dir / f"{k}{e}").is_file()), None)
        if img is None or not lbl.is_file():
            missing = lbl if img is not None else img_dir / f"{k}.jpg"
            raise UserError(f"{where}: {missing} is missing (listed/labelled sample {k!r}); the dataset is incomplete")
        items.append((k, img, lbl))
    if not items:
        raise UserError(f"{where}: no samples found in {lbl_dir}; check the folder layout")
    return items


@dataclass
class Split:
    """One split of a dataset folder: its kind, ``(key, image path, label path)`` items, class names and label LUT."""

    kind: str
    items: list[tuple[str, Path, Path]]
    class_names: list[str]
    lut: np.ndarray  # (256,) uint8 raw label -> class or 255


def _check_kind(root: Path, kind: str) -> str:
    """``kind`` checked against the layout found at ``root`` (``auto``: the layout found)."""
    detected = detect_layout(root)
    if kind == "auto":
        return detected
    if kind not in KINDS:
        raise UserError(f"{root}: unknown dataset kind {kind!r} (allowed: auto, {', '.join(KINDS)})")
    if not (kind == detected or {kind, detected} <= {"cocostuff", "cocostuff27", "scenes"}):
        raise UserError(f"{root}: dataset={kind!r} but the folder has the {detected!r} layout; set dataset: auto")
    return kind


def find_split(root: str | Path, kind: str = "auto", split: str = "val") -> Split:
    """The ``train``/``val`` split of the dataset at ``root`` (kind detected when ``auto``). Cheap: no decoding.

    Kinds: ``scenes``, ``cocostuff``, ``cocostuff27`` (:func:`_coco_split`), ``voc`` (:func:`_voc_split`),
    ``cityscapes`` (:func:`_cityscapes_split`), ``ade20k`` (:func:`_ade_split`).
    """
    root = Path(root)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    kind = _check_kind(root, kind)
    if kind in ("scenes", "cocostuff", "cocostuff27"):
        return _coco_split(root, kind, split)
    return {"voc": _voc_split, "cityscapes": _cityscapes_split, "ade20k": _ade_split}[kind](root, split)


def _scenes_classes(root: Path) -> tuple[list[str], np.ndarray]:
    meta = root / "annotations" / "semantic_classes.json"
    if not meta.is_file():
        raise UserError(f"{meta}: missing; the scenes layout lists its semantic classes there (re-run scenes)")
    try:
        return semantic_lut(json.loads(meta.read_text()), str(meta))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{meta}: not a list of {{id, name}} objects ({exc}); re-run scenes") from None


def _curated_keys(root: Path, split: str) -> list[str]:
    """PiCIE protocol: the curated list of images whose labels are mostly stuff-and-thing annotated."""
    lst = root / "curated" / f"{split}2017" / CURATED_LIST
    if not lst.is_file():
        raise UserError(
            f"{lst}: missing; COCO-Stuff-27 needs IIC's curated lists (COCOStuff164kCurated: "
            f"curated/{{train,val}}2017/{CURATED_LIST}) in the COCO-Stuff root, or set dataset: cocostuff"
        )
    return [k.strip() for k in lst.read_text().splitlines() if k.strip()]


def _coco_split(root: Path, kind: str, split: str) -> Split:
    """COCO-Stuff's layout: images in ``{split}2017/`` or ``images/{split}2017/``, label maps in
    ``stuffthingmaps_trainval2017/{split}2017/`` or ``annotations/{split}2017/``.

    - ``scenes``: the generated demo; ``annotations/semantic_classes.json`` lists ``[{"id", "name", "isthing"}]``
      (ids are mapped to their list order). By default the same maps are read from the shards instead
      (:class:`~components.data.segmentation.sources.ShardSource`), so nothing is decoded twice.
    - ``cocostuff``: COCO-Stuff 164k, 171 classes; the official ``stuffthingmaps`` (0-based fine ids 0..181 with 11
      unused thing ids, 255 = unlabelled) or mmseg's converted ``*_labelTrainIds.png`` (already 0..170).
    - ``cocostuff27``: the images of the curated IIC/PiCIE list ``curated/{split}2017/`` :data:`CURATED_LIST`, the
      182 fine ids merged into the 27 coarse classes (PiCIE's ``fine_to_coarse``): SlotCon's unsupervised protocol.
    """
    dirs = _coco_dirs(root, split)
    if dirs is None:
        raise UserError(
            f"{root}: no {split}2017 split (need {split}2017/ or images/{split}2017/ and "
            f"stuffthingmaps_trainval2017/{split}2017/ or annotations/{split}2017/ with PNG label maps)"
        )
    img_dir, lbl_dir = dirs
    if kind == "scenes":
        names, lut = _scenes_classes(root)
        keys = sorted(p.stem for p in lbl_dir.glob("*.png"))
        return Split(kind, _pairs(img_dir, lbl_dir, keys, ".png", root), names, lut)
    train_ids = any(lbl_dir.glob("*_labelTrainIds.png"))
    suffix = "_labelTrainIds.png" if train_ids else ".png"
    if kind == "cocostuff27":
        keys = _curated_keys(root, split)
        names, lut = COCOSTUFF27_CLASSES, cocostuff_lut(coarse27=True, train_ids=train_ids)
    else:
        keys = sorted(p.name[: -len(suffix)] for p in lbl_dir.glob(f"*{suffix}"))
        names, lut = COCOSTUFF_CLASSES, cocostuff_lut(coarse27=False, train_ids=train_ids)
    return Split(kind, _pairs(img_dir, lbl_dir, keys, suffix, root), list(names), lut)


def _voc_split(root: Path, split: str) -> Split:
    """PASCAL VOC 2012 (``root`` = ``VOC2012``, ``VOCdevkit`` or their parent): ``JPEGImages/``,
    ``SegmentationClass/`` (palette PNGs: 21 classes, 255 = border), ``ImageSets/Segmentation/{train,val}.txt``; with
    SBD's ``SegmentationClassAug/`` and ``ImageSets/Segmentation/{aug,train_aug}.txt`` the train split becomes VOC aug
    (10582 images), as in mmseg."""
    base = _voc_base(root)
    sets = base / "ImageSets" / "Segmentation"
    aug_list = next((sets / n for n in ("aug.txt", "train_aug.txt") if (sets / n).is_file()), None)
    aug_dir = base / "SegmentationClassAug"
    lists = [sets / f"{split}.txt"]
    if split == "train" and aug_list is not None and aug_dir.is_dir():
        lists.append(aug_list)  # VOC aug = train + SBD (mmseg: train.txt + aug.txt)
    if not lists[0].is_file():
        raise UserError(f"{lists[0]}: missing; VOC2012 lists its {split} images in ImageSets/Segmentation/")
    keys = list(dict.fromkeys(k.strip() for p in lists for k in p.read_text().splitlines() if k.strip()))
    items = []
    for k in keys:
        lbl = base / "SegmentationClass" / f"{k}.png"
        if not lbl.is_file() and split == "train":
            lbl = aug_dir / f"{k}.png"
        img = base / "JPEGImages" / f"{k}.jpg"
        if not (img.is_file() and lbl.is_file()):
            raise UserError(f"{base}: {img if not img.is_file() else lbl} is missing (listed in {split} lists)")
        items.append((k, img, lbl))
    return Split("voc", items, list(VOC_CLASSES), _lut((i, i) for i in range(21)))


def _cityscapes_split(root: Path, split: str) -> Split:
    """Cityscapes: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
    ``gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` (19 classes); ``*_labelIds.png`` alone is converted with
    the official id -> trainId table."""
    img_root, gt_root = root / "leftImg8bit" / split, root / "gtFine" / split
    if not img_root.is_dir() or not gt_root.is_dir():
        raise UserError(f"{root}: need leftImg8bit/{split}/ and gtFine/{split}/ (one folder per city)")
    items, raw_ids = [], False
    for img in sorted(img_root.glob("*/*_leftImg8bit.png")):
        stem = img.name[: -len("_leftImg8bit.png")]
        lbl = gt_root / img.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        if not lbl.is_file():
            lbl = gt_root / img.parent.name / f"{stem}_gtFine_labelIds.png"
            raw_ids = True
        if not lbl.is_file():
            raise UserError(f"{root}: {lbl} is missing (nor its _labelTrainIds.png) for image {img.name}")
        items.append((stem, img, lbl))
    if not items:
        raise UserError(f"{img_root}: no <city>/*_leftImg8bit.png images; check the Cityscapes layout")
    if raw_ids and any(str(p).endswith("_labelTrainIds.png") for _, _, p in items):
        raise UserError(f"{gt_root}: some cities have _labelTrainIds.png and some only _labelIds.png; "
                        "run cityscapesscripts/preparation/createTrainIdLabelImgs.py")
    lut = _lut(CITYSCAPES_ID_TO_TRAINID.items()) if raw_ids else _lut((i, i) for i in range(19))
    return Split("cityscapes", items, list(CITYSCAPES_CLASSES), lut)


def _ade_split(root: Path, split: str) -> Split:
    """ADE20K (ADEChallengeData2016): ``images/{training,validation}/*.jpg``, ``annotations/{...}/*.png``; 0 is
    "other" and becomes ignore, 1..150 -> 0..149 (mmseg's ``reduce_zero_label``)."""
    base = _ade_base(root)
    sub = "training" if split == "train" else "validation"
    img_dir, lbl_dir = base / "images" / sub, base / "annotations" / sub
    if not img_dir.is_dir() or not lbl_dir.is_dir():
        raise UserError(f"{base}: need images/{sub}/ and annotations/{sub}/ (ADEChallengeData2016 layout)")
    keys = sorted(p.stem for p in lbl_dir.glob("*.png"))
    lut = _lut((v, v - 1) for v in range(1, 151))  # reduce_zero_label: 0 ("other") -> ignore
    return Split("ade20k", _pairs(img_dir, lbl_dir, keys, ".png", root), list(ADE20K_CLASSES), lut)
