"""The generated scene-centric dataset: COCO layout, exact masks, semantic maps, determinism, atomic writes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from components.config import ConfigError, ScenesConfig, parse_section
from components.data.scenes import draw as sd
from components.data.scenes import stage as sc
from components.data.scenes.textures import _thing_pattern

# 24 small images: fast (~0.2 s), and with this seed every encoding (polygon, RLE, crowd RLE) occurs.
SMALL = dict(seed=3, num_train=16, num_val=8, image_size=64, num_thing_classes=6, num_stuff_classes=3)


def small_cfg(**kw) -> ScenesConfig:
    return ScenesConfig(**{**SMALL, **kw})


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "scenes"
    cfg = small_cfg()
    stats = sc.generate_scenes(cfg, out)
    return cfg, out, stats


def test_layout_counts_and_unique_ids(generated):
    cfg, out, stats = generated
    ids_seen: set[int] = set()
    for split, n in (("train2017", cfg.num_train), ("val2017", cfg.num_val)):
        jpgs = sorted((out / split).glob("*.jpg"))
        pngs = sorted((out / "stuffthingmaps_trainval2017" / split).glob("*.png"))
        assert len(jpgs) == n and len(pngs) == n
        assert [p.stem for p in jpgs] == [p.stem for p in pngs]
        doc = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert set(doc) == {"info", "licenses", "images", "annotations", "categories"}
        assert len(doc["images"]) == n
        for img in doc["images"]:
            assert img["file_name"] == f"{img['id']:012d}.jpg" and (out / split / img["file_name"]).is_file()
            assert (img["width"], img["height"]) == (cfg.image_size, cfg.image_size)
            with Image.open(out / split / img["file_name"]) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (cfg.image_size, cfg.image_size)
        assert not ids_seen & {i["id"] for i in doc["images"]}, "image ids collide across splits"
        ids_seen |= {i["id"] for i in doc["images"]}
        assert [c["id"] for c in doc["categories"]] == list(range(1, cfg.num_thing_classes + 1))
        assert all(set(c) >= {"id", "name", "supercategory"} for c in doc["categories"])
        ann_keys = {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
        assert all(set(a) == ann_keys for a in doc["annotations"])
        assert stats[f"{split[:-4]}.images"] == n
    classes = json.loads((out / "annotations" / "semantic_classes.json").read_text())
    T, S = cfg.num_thing_classes, cfg.num_stuff_classes
    assert [c["id"] for c in classes] == list(range(T + S))
    assert [c["isthing"] for c in classes] == [1] * T + [0] * S
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "stuffthingmaps_trainval2017", "train2017",
                                                     "val2017"]
    assert not list(out.parent.glob("*.tmp")), "temporary folder left behind"


def test_same_seed_is_byte_identical_and_rewrites_in_place(generated, tmp_path):
    cfg, out, _ = generated
    again = tmp_path / "scenes"
    again.mkdir()
    (again / "stale.txt").write_text("from an older run")  # an existing output is replaced whole
    killed = tmp_path / ".scenes-999999999-x1y2.tmp"  # left by a killed run (no such pid): cleaned up
    (killed / "train2017").mkdir(parents=True)
    sc.generate_scenes(cfg, again)
    assert tree_digest(again) == tree_digest(out)
    assert not (again / "stale.txt").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_different_seed_gives_different_data(generated, tmp_path):
    cfg, out, _ = generated
    other = tmp_path / "scenes"
    sc.generate_scenes(cfg.model_copy(update={"seed": cfg.seed + 1}), other)
    assert tree_digest(other) != tree_digest(out)
    first = f"{1:012d}.jpg"
    assert (other / "train2017" / first).read_bytes() != (out / "train2017" / first).read_bytes()


def test_images_do_not_depend_on_generation_order_or_split_sizes():
    """Image ``id`` is drawn from its own generator: more train images don't change val image content."""
    a, b = small_cfg(), small_cfg(num_train=3)
    vid = sc.image_ids(a, "val2017")[1]
    assert vid == sc.image_ids(b, "val2017")[1]
    sa, sb = sc.render_scene(a, vid), sc.render_scene(b, vid)
    assert np.array_equal(sa.image, sb.image) and np.array_equal(sa.semantic, sb.semantic)


def _bbox_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def test_pycocotools_loads_and_every_mask_round_trips(generated):
    cfg, out, _ = generated
    kinds: set[str] = set()
    for split in sc.SPLITS:
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == (cfg.num_train if split == "train2017" else cfg.num_val)
        ann_ids = coco.getAnnIds()
        assert len(ann_ids) == len(set(ann_ids))
        for image_id in coco.getImgIds():
            drawn = sc.render_scene(cfg, image_id).instances
            anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None)), key=lambda a: a["id"])
            assert len(anns) == len(drawn) >= 1
            for ann, inst in zip(anns, drawn):
                mask = coco.annToMask(ann).astype(bool)
                assert np.array_equal(mask, inst.mask), (split, image_id, ann["id"], inst.encoding)
                assert mask.sum() >= sd._min_visible_px(cfg.image_size)
                assert ann["area"] == float(mask.sum())
                assert ann["bbox"] == _bbox_of(mask)
                assert ann["category_id"] == inst.category_id and ann["iscrowd"] == inst.iscrowd
                seg = ann["segmentation"]
                if isinstance(seg, list):
                    kinds.add("polygon")
                    assert ann["iscrowd"] == 0 and all(len(p) >= 6 and len(p) % 2 == 0 for p in seg)
                elif isinstance(seg["counts"], str):
                    kinds.add("rle")
                    assert seg["size"] == [cfg.image_size, cfg.image_size]
                else:  # uncompressed RLE, as COCO's crowd annotations
                    kinds.add("crowd")
                    assert ann["iscrowd"] == 1 and sum(seg["counts"]) == cfg.image_size**2
    assert kinds == {"polygon", "rle", "crowd"}


def test_semantic_png_agrees_with_instance_masks(generated):
    cfg, out, stats = generated
    T, S = cfg.num_thing_classes, cfg.num_stuff_classes
    ignored = total = 0
    for split in sc.SPLITS:
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        for img in coco.dataset["images"]:
            with Image.open(out / "stuffthingmaps_trainval2017" / split / img["file_name"].replace(".jpg", ".png")) as im:
                assert im.mode == "L"
                sem = np.array(im)
            assert set(np.unique(sem).tolist()) <= set(range(T + S)) | {sc.IGNORE}
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]], iscrowd=None))
            union = np.zeros(sem.shape, bool)
            for ann in anns:
                mask = coco.annToMask(ann).astype(bool)
                union |= mask
                if not ann["iscrowd"]:
                    on = mask & (sem != sc.IGNORE)
                    assert on.sum() > 0
                    assert np.all(sem[on] == ann["category_id"] - 1), (img["id"], ann["id"])
            # every thing pixel belongs to an annotated region; everything else is stuff (or an object border)
            assert np.all(union[sem < T])
            assert np.all((sem[~union] >= T) & (sem[~union] < T + S))
            ignored += int((sem == sc.IGNORE).sum())
            total += sem.size
    assert 0 < ignored / total < 0.08  # thin borders only
    assert stats["ignore_pixel_frac"] == pytest.approx(ignored / total, abs=1e-4)


def test_jpeg_holds_the_drawn_image(generated):
    cfg, out, _ = generated
    with Image.open(out / "train2017" / f"{1:012d}.jpg") as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    own = np.abs(pixels - sc.render_scene(cfg, 1).image).mean()
    other = np.abs(pixels - sc.render_scene(cfg, 2).image).mean()
    assert own < 10.0 and own < 0.3 * other  # JPEG (q=90, 4:2:0) error only


def test_categories_are_shape_and_texture_not_colour():
    shapes = [s for _, s, _, _ in sc.THING_CATALOGUE]
    textures = [t for _, _, t, _ in sc.THING_CATALOGUE]
    assert len(set(shapes)) == len(set(textures)) == len(sc.THING_CATALOGUE)
    # textures differ from each other on the same patch of pixels
    v, u = np.mgrid[-16:16, -16:16].astype(np.float32)
    pats = [_thing_pattern(t, u, v, 6.0, np.random.default_rng(0)) for t in textures]
    for i in range(len(pats)):
        for j in range(i + 1, len(pats)):
            assert np.abs(pats[i] - pats[j]).mean() > 0.05, (textures[i], textures[j])
    # the same category appears in clearly different colours
    cfg = small_cfg(image_size=64)
    colours: dict[int, list[np.ndarray]] = {}
    for image_id in range(1, 31):
        for inst in sc.render_scene(cfg, image_id).instances:
            colours.setdefault(inst.category_id, []).extend(np.array(c) for c in inst.colours)
    assert set(colours) == set(range(1, cfg.num_thing_classes + 1))
    for cat, cs in colours.items():
        spread = max(np.abs(a - b).max() for a in cs for b in cs)
        assert spread > 0.4, f"category {cat} always has about the same colour"


def test_interrupted_run_leaves_no_complete_looking_output(tmp_path, monkeypatch):
    out = tmp_path / "scenes"
    real = sc.render_scene
    calls = {"n": 0}

    def failing(cfg, image_id):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(cfg, image_id)

    monkeypatch.setattr(sc, "render_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        sc.generate_scenes(small_cfg(), out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_config_rejects_objects_too_small_for_a_texture():
    with pytest.raises(ConfigError, match=r"scenes\.min_object_frac=0\.05 \* image_size=64 is under 4 px"):
        parse_section("scenes", {"image_size": 64, "min_object_frac": 0.05}, "params.yaml")
    with pytest.raises(ConfigError, match=r"scenes\.seed=-1 is invalid"):
        parse_section("scenes", {"seed": -1}, "params.yaml")


def test_cli_writes_dataset_and_metrics(tmp_path, capsys):
    from components.cli import main as cli_main

    params = tmp_path / "params.yaml"
    params.write_text("tracking:\n  enabled: false\nscenes:\n  num_train: 3\n  num_val: 2\n  image_size: 48\n")
    out, metrics = tmp_path / "data" / "scenes", tmp_path / "metrics" / "scenes.json"
    args = ["scenes", "--params", str(params), "--out", str(out), "--metrics", str(metrics)]
    assert cli_main(args) == 0
    stats = json.loads(metrics.read_text())
    assert stats["train.images"] == 3 and stats["val.images"] == 2 and stats["bytes"] > 0
    assert len(list((out / "val2017").glob("*.jpg"))) == 2
    # a bad --out is a one-line user error (exit 2) before any work
    (tmp_path / "file").write_text("x")
    assert cli_main(["scenes", "--params", str(params), "--out", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    # the pure function is what the CLI runs: same bytes
    direct = tmp_path / "direct"
    sc.generate_scenes(ScenesConfig(num_train=3, num_val=2, image_size=48), direct)
    assert tree_digest(direct) == tree_digest(out)


@pytest.mark.slow
def test_worker_processes_write_the_same_bytes(generated, tmp_path):
    cfg, out, _ = generated
    par = tmp_path / "scenes"
    sc.generate_scenes(cfg.model_copy(update={"workers": 2}), par)
    assert tree_digest(par) == tree_digest(out)


def test_ids_stay_int32_for_the_largest_allowed_config():
    big = ScenesConfig(num_train=10_000_000, num_val=10_000_000, max_objects=98)
    assert sc.image_ids(small_cfg(num_val=2), "val2017") == [sc.SPLIT_ID_OFFSET["val2017"] + 1,
                                                             sc.SPLIT_ID_OFFSET["val2017"] + 2]
    last_val = sc.SPLIT_ID_OFFSET["val2017"] + big.num_val
    assert last_val > big.num_train  # no collision with train ids
    assert last_val * sc.ANN_PER_IMAGE + big.max_objects + 1 < 2**31


# --------------------------------------------------------------------------------------------------------------------
# the demo's pixels are pinned; the two variants
# --------------------------------------------------------------------------------------------------------------------
def test_default_scenes_are_pinned():
    """The params defaults draw exactly what they drew before the variants existed (digest taken with the code of
    that time): pixels, semantic maps, masks and encodings of a few train/val images. numpy's Generator streams are
    stable by policy, so only a change to the drawing code moves this."""
    cfg = ScenesConfig()
    h = hashlib.sha256()
    for image_id in (1, 2, 3, 10_000_001):
        s = sc.render_scene(cfg, image_id)
        h.update(s.image.tobytes())
        h.update(s.semantic.tobytes())
        for inst in s.instances:
            h.update(inst.mask.tobytes())
            h.update(repr(inst.segmentation).encode())
    assert h.hexdigest() == "97b079faf8e4f293867ebcb11baf533574e0c6b8f6f9bab78caa70f90b6fa744"


HARD = dict(seed=1, num_train=12, num_val=4, image_size=96, min_objects=4, max_objects=10, clutter_shapes=8,
            object_spread=0.5, min_object_frac=0.08, max_object_frac=0.6)


def _hidden_fraction(cfg: ScenesConfig) -> float:
    """Of all thing pixels as drawn in full, the fraction hidden behind later objects or clutter."""
    hidden = full = 0
    for image_id in sc.image_ids(cfg, "train2017"):
        rng = sd.image_rng(cfg.seed, image_id)
        sd._draw_background(cfg, rng)
        objects = sd._layout(cfg, rng)
        for obj in objects:
            sd._full_masks(obj, cfg.image_size)
        for obj in sd._visible(objects, cfg.image_size):
            if not obj["clutter"] and not obj["crowd"]:
                hidden += int((obj["full"] & ~obj["visible"]).sum())
                full += int(obj["full"].sum())
    return hidden / full


def test_harder_variant_clutter_is_unannotated_stuff_and_occludes(tmp_path):
    cfg = ScenesConfig(**HARD)
    out = tmp_path / "hard"
    stats = sc.generate_scenes(cfg, out)
    T, S = cfg.num_thing_classes, cfg.num_stuff_classes
    classes = json.loads((out / "annotations" / "semantic_classes.json").read_text())
    assert classes[-1] == {"id": T + S, "name": "clutter", "isthing": 0} and len(classes) == T + S + 1
    coco = COCO(str(out / "annotations" / "instances_train2017.json"))
    clutter_px = 0
    for img in coco.dataset["images"]:
        with Image.open(out / "stuffthingmaps_trainval2017" / "train2017" / img["file_name"].replace(".jpg", ".png")) as im:
            sem = np.array(im)
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]], iscrowd=None)), key=lambda a: a["id"])
        drawn = sc.render_scene(cfg, img["id"]).instances
        assert len(anns) == len(drawn)
        union = np.zeros(sem.shape, bool)
        for ann, inst in zip(anns, drawn):
            mask = coco.annToMask(ann).astype(bool)
            assert np.array_equal(mask, inst.mask)  # masks still round-trip exactly through pycocotools
            union |= mask
        assert not np.any(union & (sem == T + S))  # clutter is never inside an annotated region
        assert np.all((sem[~union] >= T) & (sem[~union] <= T + S))  # outside: stuff or clutter
        clutter_px += int((sem == T + S).sum())
    assert clutter_px > 0
    # more objects per image than the demo, and much more of each object hidden
    demo = ScenesConfig(seed=1, num_train=12, num_val=4, image_size=96)
    assert stats["train.objects_per_image"] > sc.generate_scenes(demo, tmp_path / "demo")["train.objects_per_image"] + 1.5
    assert _hidden_fraction(cfg) > 2 * _hidden_fraction(demo)


def test_more_classes_variant_uses_24_things_and_16_stuff(tmp_path):
    cfg = ScenesConfig(seed=2, num_train=40, num_val=4, image_size=64, num_thing_classes=24, num_stuff_classes=16,
                       min_objects=4, max_objects=8)
    assert [c["id"] for c in sc.categories(cfg)] == list(range(1, 25))
    sem_ids = [c["id"] for c in sc.semantic_classes(cfg)]
    assert sem_ids == list(range(40)) and max(sem_ids) < sc.IGNORE
    cats: set[int] = set()
    stuff: set[int] = set()
    for image_id in sc.image_ids(cfg, "train2017"):
        s = sc.render_scene(cfg, image_id)
        cats |= {inst.category_id for inst in s.instances}
        stuff |= set(s.stuff)
        assert set(np.unique(s.semantic).tolist()) <= set(range(40)) | {sc.IGNORE}
    assert cats == set(range(1, 25)) and len(stuff) >= 14
    with pytest.raises(ConfigError, match="num_thing_classes"):
        parse_section("scenes", {"num_thing_classes": 25})
