"""The COCO-layout sources of ``prepare`` (``scenes``, ``coco``, ``cocoplus``): find each split's images in the
annotations and folders, check every image, write the split manifests and ``index.json``.

COCO's annotations are in stored-pixel coordinates (COCO ignores EXIF orientation), so these sources keep every JPEG's
bytes and never rotate; every decoder in the pipeline ignores the orientation tag too, so all paths agree.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components.data.prepare.annotations import filter_annotations, image_sizes
from components.data.prepare.images import check_image_star, map_parallel
from components.data.prepare.manifest import (
    MANIFEST_FIELDS, MAX_LISTED, add_totals, print_skips, root_ref, slotcon_schema,
)
from components.data.workers import hold_output, log_run
from components.errors import UserError
from components.io import atomic_open, sha1_file, write_json_atomic

SPLITS: dict[str, tuple[str, ...]] = {
    "scenes": ("train2017", "val2017"),
    "coco": ("train2017", "val2017"),
    "cocoplus": ("train2017", "val2017", "unlabeled2017"),
}
# SlotCon pretrains on the images only: COCO train2017 (118k) or COCO+ = train2017 + unlabeled2017 (241k).
PRETRAIN_SPLITS: dict[str, list[str]] = {
    "scenes": ["train2017"],
    "coco": ["train2017"],
    "cocoplus": ["train2017", "unlabeled2017"],
}
UNLABELED = {"unlabeled2017"}
# Where COCO ships each piece (https://cocodataset.org/#download), for the one-line error on a missing one.
COCO_ZIPS = {
    "train2017": "train2017.zip",
    "val2017": "val2017.zip",
    "unlabeled2017": "unlabeled2017.zip",
    "annotations": "annotations_trainval2017.zip",
    "unlabeled_info": "image_info_unlabeled2017.zip",
    "stuff": "stuffthingmaps_trainval2017.zip",
}
SEG_DIR = "stuffthingmaps_trainval2017"

# COCO-Stuff labels 1..182 (things 1-91 incl. the 11 removed from COCO, stuff 92-182). In stuffthingmaps PNGs the
# pixel value is label - 1 (0 = person ... 181 = wood) and 255 is unlabelled.
COCO_STUFF_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant street_sign stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe hat backpack umbrella shoe "
    "eye_glasses handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket bottle plate wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli "
    "carrot hot_dog pizza donut cake chair couch potted_plant bed mirror dining_table window desk toilet door tv "
    "laptop mouse remote keyboard cell_phone microwave oven toaster sink refrigerator blender book clock vase "
    "scissors teddy_bear hair_drier toothbrush hair_brush "
    "banner blanket branch bridge building-other bush cabinet cage cardboard carpet ceiling-other ceiling-tile cloth "
    "clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence floor-marble floor-other floor-stone "
    "floor-tile floor-wood flower fog food-other fruit furniture-other grass gravel ground-other hill house leaves "
    "light mat metal mirror-stuff moss mountain mud napkin net paper pavement pillow plant-other plastic platform "
    "playingfield railing railroad river road rock roof rug salad sand sea shelf sky-other skyscraper snow "
    "solid-other stairs stone straw structural-other table tent textile-other towel tree vegetable wall-brick "
    "wall-concrete wall-other wall-panel wall-stone wall-tile wall-wood water-other waterdrops window-blind "
    "window-other wood"
).split()
assert len(COCO_STUFF_NAMES) == 182


def coco_stuff_classes() -> list[dict[str, Any]]:
    """The 182 semantic ids of COCO-Stuff's ``stuffthingmaps`` PNGs (value = label - 1; 255 = ignore)."""
    return [
        {"id": i, "name": name.replace("_", " "), "isthing": i < 91} for i, name in enumerate(COCO_STUFF_NAMES)
    ]


# --------------------------------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """An image the split claims to have, before its bytes are checked."""

    id: int
    file_name: str
    key: str
    width: int | None = None  # from the annotation record (None for unlabelled images)
    height: int | None = None
    num_annotations: int = 0
    seg_file: str | None = None  # relative to the root


@dataclass
class SplitPlan:
    name: str
    labeled: bool
    image_dir: Path
    annotations_file: Path | None
    candidates: list[Candidate] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)  # image-level: skipped
    notes: Counter = field(default_factory=Counter)  # not image-level: orphan annotations, unlisted files, missing seg
    categories: list[dict[str, Any]] | None = None
    annotations_sha1: str | None = None
    annotations_skipped: dict[str, int] = field(default_factory=dict)  # {reason: annotations dropped}


def _hint(source: str, what: str) -> str:
    if source == "scenes":
        return "generate it with `slotcon scenes --out <root>` (or `dvc repro scenes`)"
    return f"COCO ships it in {COCO_ZIPS[what]}"


def image_key(file_name: str) -> str:
    """WebDataset key of an image: its file stem with dots replaced (a dot would split the key from the member)."""
    return Path(file_name).stem.replace(".", "_")


def load_instances(path: Path, source: str) -> dict[str, Any]:
    """Read and structurally check a COCO instances JSON; a bad file is a one-line UserError.

    Every annotation is checked against its image record's size (:mod:`components.data.prepare.annotations`): those
    that fail are left out of ``annotations`` and counted in ``annotations_skipped`` (``{reason: n}``), so ``prepare``
    reports them and ``shard`` (which reads the file through here) never writes them."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not readable as JSON ({first}); {_hint(source, 'annotations')}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise UserError(
            f"{path}: not a COCO instances file (needs lists 'images' and 'annotations'); {_hint(source, 'annotations')}"
        )
    data.setdefault("categories", [])
    data["annotations"], skipped = filter_annotations(data["annotations"], image_sizes(data["images"]))
    data["annotations_skipped"] = dict(sorted(skipped.items()))
    return data


def _discover_labeled(plan: SplitPlan, root: Path, source: str, seg_dir: Path | None) -> None:
    """The split's images as its annotations list them; a bad record, a duplicate id or key and a file named but
    absent are failures (skipped); the COCO-Stuff map of each image is attached when ``seg_dir`` has it."""
    data = load_instances(plan.annotations_file, source)
    plan.annotations_sha1 = sha1_file(plan.annotations_file)
    plan.categories = data["categories"]
    plan.annotations_skipped = data["annotations_skipped"]
    per_image: Counter = Counter()
    image_ids: set[int] = set()
    for rec in data["images"]:
        if isinstance(rec, dict) and "id" in rec:
            image_ids.add(rec["id"])
    for ann in data["annotations"]:
        img = ann.get("image_id") if isinstance(ann, dict) else None
        if img in image_ids:
            per_image[img] += 1
        else:
            plan.notes["orphan_annotations"] += 1  # an annotation for an image the JSON doesn't list
    present = {p.name for p in plan.image_dir.iterdir() if p.is_file()} if plan.image_dir.is_dir() else set()
    seen_ids: set[int] = set()
    seen_keys: set[str] = set()
    listed: set[str] = set()
    for rec in data["images"]:
        fname = rec.get("file_name") if isinstance(rec, dict) else None
        rid = rec.get("id") if isinstance(rec, dict) else None
        if not isinstance(fname, str) or not isinstance(rid, int):
            plan.failures.append({"file": str(fname), "id": rid, "reason": "bad_record", "detail": "image record needs int id and str file_name"})
            continue
        listed.add(fname)
        if rid in seen_ids:
            plan.failures.append({"file": fname, "id": rid, "reason": "duplicate_id", "detail": f"id {rid} listed twice"})
            continue
        key = image_key(fname)
        if key in seen_keys:
            plan.failures.append({"file": fname, "id": rid, "reason": "duplicate_key", "detail": f"key {key!r} listed twice"})
            continue
        if fname not in present:
            plan.failures.append(
                {"file": fname, "id": rid, "reason": "missing_file",
                 "detail": f"{plan.annotations_file.name} names it but {plan.image_dir} has no such file"}
            )
            continue
        seen_ids.add(rid)
        seen_keys.add(key)
        seg_file = None
        if seg_dir is not None:
            seg_path = seg_dir / (Path(fname).stem + ".png")
            if seg_path.is_file():
                seg_file = seg_path.relative_to(root).as_posix()
            else:
                plan.notes["missing_seg"] += 1
        w, h = rec.get("width"), rec.get("height")
        plan.candidates.append(
            Candidate(rid, fname, key, w if isinstance(w, int) else None, h if isinstance(h, int) else None,
                      per_image[rid], seg_file)
        )
    plan.notes["unlisted_files"] += sum(
        1 for n in present - listed if n.lower().endswith((".jpg", ".jpeg"))
    )  # images on disk the annotations don't mention: not part of the split


def _stable_id(stem: str) -> int:
    return int(stem) if stem.isdigit() else int.from_bytes(hashlib.blake2b(stem.encode(), digest_size=7).digest(), "big")


def _discover_unlabeled(plan: SplitPlan, root: Path) -> None:
    """The JPEGs of ``unlabeled2017/`` (COCO+); ids from ``annotations/image_info_unlabeled2017.json`` when present,
    else the numeric file stem (or a hash of it)."""
    info = root / "annotations" / "image_info_unlabeled2017.json"
    ids: dict[str, int] = {}
    if info.is_file():  # optional: COCO's ids and sizes for the unlabelled images
        data = load_instances_like_info(info)
        ids = {r["file_name"]: r["id"] for r in data if isinstance(r, dict) and "file_name" in r and "id" in r}
    seen_ids: set[int] = set()
    seen_keys: set[str] = set()
    for p in sorted(plan.image_dir.iterdir()):
        if not p.is_file() or not p.name.lower().endswith((".jpg", ".jpeg")):
            continue
        rid = ids.get(p.name, _stable_id(p.stem))
        key = image_key(p.name)
        if rid in seen_ids or key in seen_keys:
            plan.failures.append({"file": p.name, "id": rid, "reason": "duplicate_id", "detail": f"id {rid} / key {key!r} seen twice"})
            continue
        seen_ids.add(rid)
        seen_keys.add(key)
        plan.candidates.append(Candidate(rid, p.name, key))


def load_instances_like_info(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
        return list(data["images"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a COCO image-info file ({exc}); {_hint('coco', 'unlabeled_info')}") from None


def discover(source: str, root: str | os.PathLike) -> list[SplitPlan]:
    """Check the layout of ``root`` for ``source`` and list each split's candidate images (no image is read yet).

    Raises a one-line :class:`UserError` when the root, a split folder or an annotation file is missing.
    """
    if source not in SPLITS:
        raise UserError(f"data.source={source!r}: must be one of {sorted(SPLITS)}")
    root = Path(root)
    if not root.is_dir():
        what = "the generated scenes" if source == "scenes" else "a COCO root (train2017/, val2017/, annotations/)"
        raise UserError(f"{root}: folder not found; expected {what} there; {_hint(source, 'annotations')}")
    plans: list[SplitPlan] = []
    for split in SPLITS[source]:  # check the whole layout before reading any image
        image_dir = root / split
        if not image_dir.is_dir():
            raise UserError(f"{root}: {split}/ not found; {_hint(source, split)}")
        ann = None if split in UNLABELED else root / "annotations" / f"instances_{split}.json"
        if ann is not None and not ann.is_file():
            raise UserError(f"{root}: annotations/instances_{split}.json not found; {_hint(source, 'annotations')}")
        plans.append(SplitPlan(split, split not in UNLABELED, image_dir, ann))
    for plan in plans:
        if plan.labeled:
            seg_dir = root / SEG_DIR / plan.name
            _discover_labeled(plan, root, source, seg_dir if seg_dir.is_dir() else None)
        else:
            _discover_unlabeled(plan, root)
        if not plan.candidates and not plan.failures:
            raise UserError(f"{plan.image_dir}: no images listed for split {plan.name}; {_hint(source, plan.name)}")
    return plans


def semantic_classes(root: Path) -> list[dict[str, Any]] | None:
    """``annotations/semantic_classes.json`` when present (scenes), else COCO-Stuff's when its maps exist, else None."""
    path = root / "annotations" / "semantic_classes.json"
    if path.is_file():
        try:
            classes = json.loads(path.read_text())
            assert isinstance(classes, list) and all({"id", "name"} <= set(c) for c in classes)
        except (ValueError, AssertionError, TypeError):
            raise UserError(f"{path}: must be a JSON list of {{'id', 'name', 'isthing'}} records") from None
        return [{"id": int(c["id"]), "name": str(c["name"]), "isthing": bool(c.get("isthing", False))} for c in classes]
    if (root / SEG_DIR).is_dir():
        return coco_stuff_classes()
    return None


# --------------------------------------------------------------------------------------------------------------------
# checking and writing
# --------------------------------------------------------------------------------------------------------------------
def _write_manifest(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    table = pa.Table.from_pylist(rows, schema=slotcon_schema(MANIFEST_FIELDS, meta))
    with atomic_open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")


def _check_rows(cfg, plan: SplitPlan, root: Path, progress: bool) -> tuple[list[dict], list[dict], Counter]:
    """Check every candidate of ``plan`` in parallel: (usable rows sorted by key, failures, notes).

    A bad image (zero bytes, not a JPEG, truncated, undecodable, size different from its record) is skipped and
    listed; a bad semantic map drops only the map. Images with the same bytes under two ids are listed
    (``duplicate_content``) and kept: each id has its own annotations.
    """
    tasks = [
        (str(plan.image_dir / c.file_name), str(root / c.seg_file) if c.seg_file else None)
        for c in plan.candidates
    ]
    rows: list[dict[str, Any]] = []
    failures = list(plan.failures)
    notes = Counter(plan.notes)
    for cand, res in zip(plan.candidates, map_parallel(check_image_star, tasks, cfg.workers, f"prepare {plan.name}", progress)):
        if res["reason"] is None and cand.width is not None and (cand.width, cand.height) != (res["width"], res["height"]):
            res["reason"] = "size_mismatch"  # annotations (boxes, masks) would not line up with the pixels
            res["detail"] = f"record says {cand.width}x{cand.height}, file is {res['width']}x{res['height']}"
        if res["reason"] is not None:
            failures.append({"file": cand.file_name, "id": cand.id, "reason": res["reason"], "detail": res["detail"]})
            continue
        seg_file = cand.seg_file
        if seg_file is not None and res["seg_error"]:
            notes["bad_seg"] += 1  # the image is fine; only its semantic map is dropped (and counted)
            failures.append({"file": seg_file, "id": cand.id, "reason": "bad_seg", "detail": res["seg_error"], "image_kept": True})
            seg_file = None
        rows.append({
            "key": cand.key, "id": cand.id, "file_name": cand.file_name, "width": res["width"],
            "height": res["height"], "mode": res["mode"], "bytes": res["bytes"], "sha1": res["sha1"],
            "num_annotations": cand.num_annotations, "seg_file": seg_file,
        })
    rows.sort(key=lambda r: r["key"])
    first: dict[str, str] = {}
    for r in rows:  # the same bytes under two ids: reported, kept (each id has its own annotations)
        if r["sha1"] in first:
            notes["duplicate_content"] += 1
            failures.append({"file": r["file_name"], "id": r["id"], "reason": "duplicate_content",
                             "detail": f"same bytes as {first[r['sha1']]}", "image_kept": True})
        else:
            first[r["sha1"]] = r["file_name"]
    return rows, failures, notes


def _prepare_split(cfg, plan: SplitPlan, root: Path, out_dir: Path, progress: bool) -> tuple[dict, dict]:
    """Check one split and write ``<out>/<source>/<split>/manifest.parquet``: (split metrics, index entry).

    Manifest rows are sorted by key: ``key`` (file stem, no dots), ``id``, ``file_name``, ``width``, ``height``,
    ``mode`` (PIL mode), ``bytes``, ``sha1`` (of the file), ``num_annotations``, ``seg_file`` (relative to the root, or
    null); the ``slotcon`` metadata lists every skipped file (file, id, reason, detail) and the counts per reason.
    """
    rows, failures, notes = _check_rows(cfg, plan, root, progress)
    skipped = [f for f in failures if not f.get("image_kept")]
    by_reason = dict(sorted(Counter(f["reason"] for f in skipped).items()))
    if not rows:
        raise UserError(
            f"{plan.image_dir}: none of the {len(plan.candidates) + len(plan.failures)} images of {plan.name} is "
            f"usable ({by_reason}); {_hint(cfg.source, plan.name)}"
        )
    split_metrics = {
        "images": len(rows),
        "skipped": len(skipped),
        "skipped_by_reason": by_reason,
        "annotations": sum(r["num_annotations"] for r in rows),
        "annotations_skipped": dict(plan.annotations_skipped),
        "with_seg": sum(r["seg_file"] is not None for r in rows),
        "bytes": sum(r["bytes"] for r in rows),
        **{k: notes.get(k, 0) for k in ("orphan_annotations", "unlisted_files", "missing_seg", "bad_seg",
                                        "duplicate_content")},
    }
    meta = {
        "source": cfg.source, "split": plan.name, "labeled": plan.labeled, "counts": split_metrics,
        "failures": sorted(failures, key=lambda f: (f["reason"], str(f["file"])))[:MAX_LISTED],
    }
    _write_manifest(out_dir / cfg.source / plan.name / "manifest.parquet", rows, meta)
    print_skips(plan.name, failures)
    if plan.annotations_skipped:
        print(f"prepare: {plan.name}: skipped {sum(plan.annotations_skipped.values())} annotations that cannot be "
              f"rasterised safely {plan.annotations_skipped} (see components/data/prepare/annotations.py)")
    entry = {
        "labeled": plan.labeled,
        "manifest": f"{cfg.source}/{plan.name}/manifest.parquet",
        "image_dir": plan.image_dir.relative_to(root).as_posix(),
        "annotations": plan.annotations_file.relative_to(root).as_posix() if plan.annotations_file else None,
        "annotations_sha1": plan.annotations_sha1,
        "num_images": len(rows),
        "num_skipped": len(skipped),
    }
    return split_metrics, entry


def run_prepare_coco(cfg, scenes_root: str | os.PathLike, out_dir: str | os.PathLike, *, tracker=None,
                     progress: bool = True) -> dict[str, Any]:
    """``prepare`` for ``cfg.source`` in (scenes, coco, cocoplus): manifests + ``index.json`` under ``out_dir``; metrics.

    The root is ``scenes_root`` for ``scenes``, else ``data.coco_root``. ``index.json`` holds what ``shard`` needs:
    source, root, splits (labelled or not, annotation file and its sha1, counts), the pretraining splits, COCO's
    categories and the semantic classes of the segmentation maps. Raw images stay where they are.
    """
    with hold_output(out_dir, "slotcon prepare") as work:
        metrics = _prepare_root(cfg, scenes_root, out_dir, tracker=tracker, progress=progress)
        shutil.rmtree(work, ignore_errors=True)
    return metrics


def _prepare_root(cfg, scenes_root, out_dir, *, tracker, progress) -> dict[str, Any]:
    t0 = time.perf_counter()
    root = Path(scenes_root if cfg.source == "scenes" else cfg.coco_root)
    out_dir = Path(out_dir)
    plans = discover(cfg.source, root)  # all layout errors raise here, before any image is read
    classes = semantic_classes(root)
    categories = next((p.categories for p in plans if p.categories is not None), [])
    metrics: dict[str, Any] = {"source": cfg.source, "splits": {}}
    index_splits: dict[str, Any] = {}
    for plan in plans:
        metrics["splits"][plan.name], index_splits[plan.name] = _prepare_split(cfg, plan, root, out_dir, progress)
    index = {
        "source": cfg.source, "root": root_ref(root, out_dir), "splits": index_splits,
        "pretrain": PRETRAIN_SPLITS[cfg.source], "train": "train2017", "val": "val2017",
        "categories": categories, "semantic_classes": classes,
    }
    write_json_atomic(out_dir / "index.json", index)
    seconds = time.perf_counter() - t0
    add_totals(metrics, seconds)
    metrics["annotations_skipped"] = dict(sorted(sum((Counter(m["annotations_skipped"]) for m in
                                                      metrics["splits"].values()), Counter()).items()))
    print(f"prepare: {cfg.source}: {metrics['images']} images ok, {metrics['skipped']} skipped, "
          f"{metrics['bytes'] / 1e6:.1f} MB checked in {seconds:.1f} s ({metrics['img_per_s']:.0f} img/s)")
    log_run(tracker, metrics, index, "prepare_index.json")
    return metrics
