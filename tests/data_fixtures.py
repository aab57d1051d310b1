"""A tiny COCO-layout dataset for the data tests (prepare / shard / loader), written in a temp dir in ~0.1 s.

Layout as COCO ships it: ``train2017/*.jpg``, ``val2017/*.jpg``, optional ``unlabeled2017/*.jpg``,
``annotations/instances_{train,val}2017.json``, ``stuffthingmaps_trainval2017/{split}/<stem>.png`` and
``annotations/semantic_classes.json``. Image sizes vary (48-72 px) so shapes are checked, not assumed.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = [
    {"id": 1, "name": "disc", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "bar", "supercategory": "shape"},
]
SEMANTIC = [{"id": 0, "name": "sky", "isthing": False}] + [
    {"id": c["id"], "name": c["name"], "isthing": True} for c in CATEGORIES
]


def jpeg_bytes(arr: np.ndarray, mode: str | None = None, **kw) -> bytes:
    img = Image.fromarray(arr)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    img = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
    seg = np.zeros((h, w), np.uint8)
    objs = []
    for _ in range(int(rng.integers(1, 4))):
        cat = int(rng.integers(1, 4))
        bw, bh = int(rng.integers(8, w // 2)), int(rng.integers(8, h // 2))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        img[y : y + bh, x : x + bw] = rng.integers(0, 256, 3)
        seg[y : y + bh, x : x + bw] = cat
        objs.append({"category_id": cat, "bbox": [x, y, bw, bh]})
    img = np.clip(img.astype(int) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    return img, seg, objs


def write_coco(
    root: str | Path,
    *,
    n_train: int = 12,
    n_val: int = 4,
    n_unlabeled: int = 0,
    seed: int = 0,
    with_seg: bool = True,
) -> Path:
    """Write the dataset; image ids are 1.. (train), 1001.. (val); file names are COCO's 12-digit ids."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split, n, first in (("train2017", n_train, 1), ("val2017", n_val, 1001)):
        (root / split).mkdir(parents=True, exist_ok=True)
        if with_seg:
            (root / "stuffthingmaps_trainval2017" / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            iid = first + i
            h, w = int(rng.integers(48, 73)), int(rng.integers(48, 73))
            img, seg, objs = _image(rng, h, w)
            fname = f"{iid:012d}.jpg"
            (root / split / fname).write_bytes(jpeg_bytes(img))
            if with_seg:
                (root / "stuffthingmaps_trainval2017" / split / f"{iid:012d}.png").write_bytes(png_bytes(seg))
            images.append({"id": iid, "file_name": fname, "width": w, "height": h, "license": 1})
            for o in objs:
                x, y, bw, bh = o["bbox"]
                anns.append({
                    "id": ann_id, "image_id": iid, "category_id": o["category_id"], "bbox": [x, y, bw, bh],
                    "area": bw * bh, "iscrowd": 0,
                    "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
                })
                ann_id += 1
        data = {"info": {"description": "tiny"}, "images": images, "annotations": anns, "categories": CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    if with_seg:
        (root / "annotations" / "semantic_classes.json").write_text(json.dumps(SEMANTIC))
    if n_unlabeled:
        (root / "unlabeled2017").mkdir(parents=True, exist_ok=True)
        for i in range(n_unlabeled):
            img, _, _ = _image(rng, 56, 64)
            (root / "unlabeled2017" / f"{500000 + i:012d}.jpg").write_bytes(jpeg_bytes(img))
    return root


def read_instances(root: Path, split: str) -> dict:
    return json.loads((Path(root) / "annotations" / f"instances_{split}.json").read_text())


def write_instances(root: Path, split: str, data: dict) -> None:
    (Path(root) / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def tiny_scene_shards(root: Path) -> Path:
    """48 + 8 generated scenes (64 px) in 4 + 1 shards under ``root``: the real scenes -> prepare -> shard path, tiny
    (the pretraining tests' data, each module building its own copy once)."""
    from components.config import DataConfig, ScenesConfig, ShardConfig
    from components.data.prepare.coco import run_prepare
    from components.data.scenes.stage import generate_scenes
    from components.data.shards.stage import run_shard

    generate_scenes(ScenesConfig(num_train=48, num_val=8, image_size=64), root / "scenes")
    run_prepare(DataConfig(), root / "scenes", root / "raw", progress=False)
    run_shard(ShardConfig(max_count=16, workers=1), root / "raw", root / "shards", progress=False)
    return root / "shards"


def run_pretrain_in(cfg, shards: Path, out: Path, **kw):
    """``run_pretrain`` with every output under ``out`` (models/, ckpt/, metrics.json, plots/), no progress bars."""
    from components.pretrain.stage import run_pretrain

    return run_pretrain(cfg, shards, out / "models", out / "ckpt", out / "metrics.json", out / "plots",
                        progress=False, **kw)
