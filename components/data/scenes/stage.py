"""Stage ``scenes``: the embedded default dataset, scene-centric images (several objects in cluttered layouts, as in
COCO, which SlotCon learns objects from) generated offline and deterministically from a seed, written in COCO 2017's
layout with COCO-Stuff semantic maps.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from components.config import ScenesConfig
from components.data.scenes.draw import (
    CLUTTER_NAME, IGNORE, STUFF_CATALOGUE, THING_CATALOGUE, DrawnInstance, Scene, render_scene,
)
from components.errors import UserError
from components.stage import Arg, Stage

SPLITS: tuple[str, ...] = ("train2017", "val2017")
# Image ids: train 1..num_train, val VAL_ID_OFFSET+1.. (config caps num_train below it) -> unique across splits and a
# val image's id/content doesn't depend on num_train.
SPLIT_ID_OFFSET: dict[str, int] = {"train2017": 0, "val2017": 10_000_000}
ANN_PER_IMAGE = 100  # annotation id = image_id * 100 + k (k <= max_objects + 1 crowd <= 99): unique across
# splits, independent of generation order, and < 2**31 for every allowed config (int32-safe downstream)


# ----------------------------------------------------------------------------------------------------------------
# encoding and the whole dataset
# ----------------------------------------------------------------------------------------------------------------
def _jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    # fixed settings -> identical bytes for identical pixels; 4:2:0 as most COCO JPEGs
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False, progressive=False)
    return buf.getvalue()


def _png_bytes(semantic: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(semantic).save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def categories(cfg: ScenesConfig) -> list[dict]:
    """COCO ``categories``: ids 1..T."""
    return [
        {"id": i + 1, "name": name, "supercategory": sup}
        for i, (name, _shape, _tex, sup) in enumerate(THING_CATALOGUE[: cfg.num_thing_classes])
    ]


def semantic_classes(cfg: ScenesConfig) -> list[dict]:
    """Semantic ids 0..T+S-1 of the PNG maps: things first (category_id - 1), then stuff; with ``clutter_shapes`` the
    distractors' stuff class ``clutter`` is id T+S (at most 24 + 16 + 1 classes: far below the ignore value 255)."""
    things = [{"id": c["id"] - 1, "name": c["name"], "isthing": 1} for c in categories(cfg)]
    stuff = [
        {"id": cfg.num_thing_classes + k, "name": name, "isthing": 0}
        for k, (name, _tex, _rgb) in enumerate(STUFF_CATALOGUE[: cfg.num_stuff_classes])
    ]
    if cfg.clutter_shapes:
        stuff.append({"id": cfg.num_thing_classes + cfg.num_stuff_classes, "name": CLUTTER_NAME, "isthing": 0})
    return things + stuff


def image_ids(cfg: ScenesConfig, split: str) -> list[int]:
    n = cfg.num_train if split == "train2017" else cfg.num_val
    return [SPLIT_ID_OFFSET[split] + i + 1 for i in range(n)]


def _annotation(scene: Scene, k: int, inst: DrawnInstance) -> dict:
    """COCO's annotation record; ``area`` and ``bbox`` are computed from the decoded mask (which, by construction, is
    what ``COCO.annToMask`` decodes from the segmentation: see :mod:`components.data.scenes.shapes`)."""
    rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
    return {
        "id": scene.image_id * ANN_PER_IMAGE + k,
        "image_id": scene.image_id,
        "category_id": inst.category_id,
        "segmentation": inst.segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": inst.iscrowd,
    }


@dataclass
class _Encoded:
    """One image, ready to write: what a worker process sends back (no big arrays)."""

    image: dict
    jpeg: bytes
    png: bytes
    annotations: list[dict]
    encodings: dict[str, int]
    pixels: tuple[int, int, int]  # thing, stuff, ignore pixel counts of the semantic map


def _encode_scene(job: tuple[ScenesConfig, int]) -> _Encoded:
    cfg, image_id = job
    scene = render_scene(cfg, image_id)
    sem = scene.semantic
    T = cfg.num_thing_classes
    encodings: dict[str, int] = {}
    for inst in scene.instances:
        encodings[inst.encoding] = encodings.get(inst.encoding, 0) + 1
    n_ignore = int(np.count_nonzero(sem == IGNORE))
    n_thing = int(np.count_nonzero(sem < T))
    return _Encoded(
        image={"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": cfg.image_size,
               "height": cfg.image_size, "license": 1},
        jpeg=_jpeg_bytes(scene.image, cfg.jpeg_quality),
        png=_png_bytes(sem),
        annotations=[_annotation(scene, k, inst) for k, inst in enumerate(scene.instances, start=1)],
        encodings=encodings,
        pixels=(n_thing, sem.size - n_thing - n_ignore, n_ignore),
    )


def _dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete ``.<name>-<pid>-*.tmp`` folders left by killed runs (their process is gone); live ones are kept."""
    for d in out_dir.parent.glob(f".{out_dir.name}-*.tmp"):
        try:
            pid = int(d.name[len(out_dir.name) + 2 :].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def _preview(out_dir: Path, cfg: ScenesConfig, n: int = 8) -> Image.Image:
    """A strip of the first ``n`` train images over their semantic maps (ignore = white), for the MLflow record."""
    palette = (np.random.default_rng(0).random((256, 3)) * 200 + 30).astype(np.uint8)
    palette[IGNORE] = 255
    cols = []
    for image_id in image_ids(cfg, "train2017")[:n]:
        stem = f"{image_id:012d}"
        with Image.open(out_dir / "train2017" / f"{stem}.jpg") as im:
            rgb = np.asarray(im.convert("RGB"))
        with Image.open(out_dir / "stuffthingmaps_trainval2017" / "train2017" / f"{stem}.png") as im:
            sem = palette[np.asarray(im)]
        cols.append(np.concatenate([rgb, sem], 0))
    return Image.fromarray(np.concatenate(cols, 1))



def _write_split(cfg: ScenesConfig, tmp: Path, split: str, pool, pixels: np.ndarray) -> dict[str, Any]:
    """Write one split's images, semantic maps and instances JSON under ``tmp``; returns its statistics.
    ``pixels`` (thing, stuff, ignore, total) accumulates over splits."""
    ids = image_ids(cfg, split)
    (tmp / split).mkdir()
    sem_dir = tmp / "stuffthingmaps_trainval2017" / split
    sem_dir.mkdir(parents=True)
    images, anns = [], []
    enc_counts = {"polygon": 0, "rle": 0, "crowd_rle": 0}
    jobs = [(cfg, image_id) for image_id in ids]
    results = pool.imap(_encode_scene, jobs, chunksize=8) if pool else map(_encode_scene, jobs)
    for enc in tqdm(results, total=len(ids), desc=f"scenes {split}", unit="img", mininterval=1.0, leave=False):
        (tmp / split / enc.image["file_name"]).write_bytes(enc.jpeg)
        (sem_dir / enc.image["file_name"].replace(".jpg", ".png")).write_bytes(enc.png)
        images.append(enc.image)
        anns.extend(enc.annotations)
        for k, v in enc.encodings.items():
            enc_counts[k] += v
        pixels += (*enc.pixels, cfg.image_size**2)
    doc = {
        "info": {"description": f"slotcon-pipeline generated scenes (seed {cfg.seed})", "version": "1.0",
                 "year": 2017, "contributor": "components/data/scenes/stage.py", "url": "", "date_created": ""},
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": anns,
        "categories": categories(cfg),
    }
    (tmp / "annotations" / f"instances_{split}.json").write_bytes(_dump_json(doc))
    short = split.removesuffix("2017")
    per_cat = np.bincount([a["category_id"] for a in anns if not a["iscrowd"]], minlength=cfg.num_thing_classes + 1)
    return {
        f"{short}.images": len(images),
        f"{short}.annotations": len(anns),
        f"{short}.polygon": enc_counts["polygon"],
        f"{short}.rle": enc_counts["rle"],
        f"{short}.crowd": enc_counts["crowd_rle"],
        f"{short}.objects_per_image": round((len(anns) - enc_counts["crowd_rle"]) / max(1, len(images)), 4),
        f"{short}.min_instances_per_category": int(per_cat[1:].min()),
    }


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """The swap: an interrupted run leaves only a *.tmp folder, never a half-written out_dir."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}-{os.getpid()}-old.tmp")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _log_to_tracker(tracker: Any, stats: dict, cfg: ScenesConfig, out_dir: Path) -> None:
    tracker.log_metrics(stats)
    tracker.log_dict({"categories": categories(cfg), "semantic_classes": semantic_classes(cfg)},
                     "scenes/classes.json")
    with tempfile.TemporaryDirectory() as d:
        _preview(out_dir, cfg).save(Path(d) / "preview.png")
        tracker.log_artifact(Path(d) / "preview.png", "scenes")


def generate_scenes(cfg: ScenesConfig, out_dir: str | os.PathLike, tracker: Any = None) -> dict:
    """Generate the whole dataset under ``out_dir`` (replaced atomically) and return its statistics.

    Output (COCO 2017 + COCO-Stuff layout): ``{train2017,val2017}/<12-digit id>.jpg`` (ids unique across splits),
    ``annotations/instances_{train,val}2017.json``, ``annotations/semantic_classes.json`` (``[{"id", "name",
    "isthing"}]``) and ``stuffthingmaps_trainval2017/{train2017,val2017}/<stem>.png`` (uint8: things 0..T-1 =
    category_id - 1, stuff T..T+S-1, 255 = ignore on a 1-px inner border of each thing instance). Segmentations use
    all three encodings real COCO files contain: polygons for most instances, compressed RLE for some, uncompressed
    RLE for ``iscrowd: 1`` regions.

    Determinism: image ``id`` is drawn from its own generator (:func:`~components.data.scenes.draw.image_rng`),
    independent of generation order and of ``num_train``; JPEG/PNG settings are fixed and JSON has sorted keys and no
    timestamps, so the same params give a byte-identical tree. The tree is written to a temporary folder beside
    ``out_dir`` and renamed into place at the end, so an interrupted run never looks complete.

    Returns a flat dict of numbers (per-split image/annotation counts, encodings,
    crowd regions, mean objects per image, pixel fractions of thing/stuff/ignore, bytes on disk, seconds).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; remove it or pass another --out")
    if cfg.num_thing_classes > len(THING_CATALOGUE) or cfg.num_stuff_classes > len(STUFF_CATALOGUE):
        raise UserError(f"params: scenes has at most {len(THING_CATALOGUE)} thing / {len(STUFF_CATALOGUE)} stuff "
                        "classes; lower num_thing_classes / num_stuff_classes")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-{os.getpid()}-", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the dataset folder should get the usual permissions
    stats: dict[str, Any] = {}
    pixels = np.zeros(4, np.int64)  # thing, stuff, ignore, total
    # images are independent (own generator each): workers only change the speed, never the bytes. "spawn" keeps
    # children clean of the parent's threads (tqdm monitor, MLflow, torch) at ~1 s start-up each.
    pool = None
    try:
        if cfg.workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(cfg.workers)
        (tmp / "annotations").mkdir()
        for split in SPLITS:
            stats.update(_write_split(cfg, tmp, split, pool, pixels))
        (tmp / "annotations" / "semantic_classes.json").write_bytes(_dump_json(semantic_classes(cfg)))
        size = _dir_bytes(tmp)
        _swap_into_place(tmp, out_dir)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    n_img = stats["train.images"] + stats["val.images"]
    thing, stuff, ignore, total = (int(v) for v in pixels)
    stats.update(
        {
            "thing_pixel_frac": round(thing / total, 4),
            "stuff_pixel_frac": round(stuff / total, 4),
            "ignore_pixel_frac": round(ignore / total, 4),
            "bytes": size,
            "seconds": round(seconds, 3),
            "images_per_s": round(n_img / max(seconds, 1e-9), 1),
        }
    )
    if tracker is not None and getattr(tracker, "active", True):
        _log_to_tracker(tracker, stats, cfg, out_dir)
    return stats


run_scenes = generate_scenes  # the name every stage gives its pure function (run_<stage>)


# ----------------------------------------------------------------------------------------------------------------
# CLI: slotcon scenes --out data/scenes
# ----------------------------------------------------------------------------------------------------------------
def _run_stage(ctx) -> dict:
    return generate_scenes(ctx.cfg, ctx.path("out"), tracker=ctx.tracker)


def _summary(stats: dict) -> str:
    return (f"{stats['train.images']} train + {stats['val.images']} val images, "
            f"{stats['train.annotations'] + stats['val.annotations']} annotations, {stats['bytes'] / 1e6:.1f} MB "
            f"in {stats['seconds']:.1f} s ({stats['images_per_s']:.0f} img/s)")


STAGE = Stage(
    name="scenes", section="scenes", run=_run_stage, metrics="metrics/scenes.json", summary=_summary,
    headline=("train.images", "val.images"),
    args=(Arg("out", "data/scenes", "dataset root to (re)write"),),
)
