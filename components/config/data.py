"""The ``tracking`` section and the data sections of ``params.yaml``: ``scenes`` (the generated dataset), ``data``
(which source ``prepare`` reads) and ``shard`` (the WebDataset shards)."""
from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from components.config.schema import MAX_WORKERS, SEED_MAX, Section, knob


class TrackingConfig(Section):
    enabled: bool = knob(True, "MLflow on; false makes every logging call a no-op (e.g. quick local debugging)")
    tracking_uri: str = knob("sqlite:///mlflow.db", "MLFLOW_TRACKING_URI overrides; SQLite: MLflow 3 deprecates file "
                                                     "stores")
    artifact_location: str = knob("mlartifacts", "a local store's artifact folder (relative to the repo); with an "
                                                 "MLflow server the server's proxied store is used unless this is a "
                                                 "URI (s3://..., mlflow-artifacts:/x); SLOTCON_ARTIFACT_LOCATION "
                                                 "overrides")
    experiment: str = knob("slotcon-pipeline", "SLOTCON_EXPERIMENT overrides", min_length=1)
    registered_model: str = knob("slotcon-backbone", min_length=1)


class ScenesConfig(Section):
    """``scenes``: the generated scene-centric dataset in COCO format (data/scenes)."""

    seed: int = knob(0, "image i is drawn from default_rng([seed, id]): same seed -> byte-identical images, JSON and "
                        "PNGs", ge=0, le=SEED_MAX)
    num_train: int = knob(192, "demo size: small enough for CPU epochs in seconds, large enough for the losses to "
                               "move; val ids start at 10_000_001 (no collision)", ge=1, le=10_000_000)
    num_val: int = knob(48, ge=1, le=10_000_000)
    image_size: int = knob(128, "square; COCO images are ~640x480", ge=32, le=1024)
    min_objects: int = knob(2, "scene-centric: several objects per image, as in COCO (~7 on average)", ge=1)
    max_objects: int = knob(5, "annotation id = image_id * 100 + k stays < 2**31", ge=1, le=98)
    num_thing_classes: int = knob(6, '"things": categories told apart by shape and texture, not colour; up to 24 '
                                     '(13-24: the "more classes" variant for regional contrast, with new shapes and '
                                     "textures; the first 12 are the demo's)", ge=1, le=24)
    num_stuff_classes: int = knob(3, 'backgrounds ("stuff"), labelled in the semantic maps; up to 16 (9-16: the "more '
                                     'classes" variant)', ge=1, le=16)
    min_object_frac: float = knob(0.15, "object size as a fraction of the image side", gt=0.0, le=1.0)
    max_object_frac: float = knob(0.45, gt=0.0, le=1.0)
    clutter_shapes: int = knob(0, '"harder" variant: unannotated distractor blobs/sticks per image at random depths '
                                  '(they occlude objects), labelled as a "clutter" stuff class in the semantic maps; '
                                  "0 = off", ge=0, le=64)
    object_spread: float = knob(1.0, '"harder" variant: object centres spread over this fraction of the image around '
                                     "a per-image focus point (< 1: objects pile up and occlude each other); 1 = off",
                                gt=0.0, le=1.0)
    jpeg_quality: int = knob(90, "fixed encoder settings (4:2:0, no optimize) keep the bytes reproducible", ge=50,
                             le=100, above="harder scenes, e.g.: min_objects 4, max_objects 10, min/max_object_frac "
                             "0.08/0.6, clutter_shapes 8, object_spread 0.5. More classes, e.g.: num_thing_classes 24, "
                             "num_stuff_classes 16. The defaults above leave the demo's bytes unchanged.")
    workers: int = knob(1, "processes drawing images; same bytes for any value; the demo takes ~2 s on one (1 is "
                           "fastest)", ge=1, le=MAX_WORKERS)

    @model_validator(mode="after")
    def _check(self) -> "ScenesConfig":
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects={self.min_objects} must be <= max_objects={self.max_objects}")
        if self.min_object_frac > self.max_object_frac:
            raise ValueError(f"min_object_frac={self.min_object_frac} must be <= max_object_frac={self.max_object_frac}")
        if self.min_object_frac * self.image_size < 4:
            raise ValueError(
                f"min_object_frac={self.min_object_frac} * image_size={self.image_size} is under 4 px: objects would "
                "be too small to carry a texture; raise min_object_frac or image_size"
            )
        return self


class DataConfig(Section):
    """``data``: which source ``prepare`` reads and how it treats images. ``imagenet``/``folder`` read ``root``;
    ``include``/``exclude`` are globs on paths relative to it (``**`` = any folders), applied to both."""

    source: Literal["scenes", "coco", "cocoplus", "imagenet", "folder"] = knob(
        "scenes", "scenes (generated offline, the default) | coco | cocoplus (COCO+ = train2017 + unlabeled2017) | "
                  "imagenet | folder")
    coco_root: str = knob("", "for coco/cocoplus: a COCO root as COCO ships it (train2017/, val2017/, annotations/, "
                              "unlabeled2017/)")
    root: str = knob("", "for imagenet (train/<wnid>/*.JPEG + val/) and folder (any tree of images, recursive)")
    include: list[str] = knob(["**"], 'imagenet/folder: globs on paths relative to root (** = any folders); e.g. '
                                      '["train/n01*/**"] (a class subset)')
    exclude: list[str] = knob([], 'e.g. ["**/thumbnails/**", "**/*_mask.png"]; left-out files are counted as '
                                  '"excluded"')
    non_jpeg: Literal["transcode", "skip"] = knob(
        "transcode", "images that are not JPEG (PNG, WebP, BMP, TIFF, GIF; 16-bit/palette/alpha PNGs): transcode "
                     "(decoded once, at shard time, and stored as an upright JPEG: transcode_quality, 4:4:4, EXIF "
                     "orientation applied; one lossy generation, but every decode path -- CPU libjpeg-turbo, GPU "
                     "nvJPEG batch decode -- then reads every sample fast and the same) | skip (counted as not_jpeg "
                     "and left out, for collections where they are noise: masks, plots). Keeping their own bytes is "
                     "not offered: nvJPEG can't decode them and the CPU fallback would be ~5x slower. EXIF-rotated "
                     "(orientation != 1) and CMYK/YCCK JPEGs are transcoded under both: nvJPEG and decode_jpeg ignore "
                     "EXIF orientation and nvJPEG can't read CMYK")
    transcode_quality: int = knob(95, "JPEG quality (4:4:4) of transcoded images", ge=70, le=100)
    duplicates: Literal["skip", "keep"] = knob(
        "skip", "same bytes as an earlier image of the split: skip (counted, reason duplicate) | keep; either way "
                "every pair is listed in the manifest metadata")
    workers: int = knob(2, "processes that hash/decode-check images in `prepare`", ge=1, le=MAX_WORKERS)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source in ("coco", "cocoplus") and not self.coco_root:
            raise ValueError(f"source={self.source!r} needs data.coco_root (the folder holding train2017/ and annotations/)")
        if self.source in ("imagenet", "folder") and not self.root:
            raise ValueError(f"source={self.source!r} needs data.root (the folder to read images from)")
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                if not pattern or pattern.startswith("/"):
                    raise ValueError(f"{name} pattern {pattern!r} must be a non-empty glob relative to data.root")
        if not self.include:
            raise ValueError("include=[] selects nothing; use ['**'] for every file")
        return self


class ShardConfig(Section):
    max_count: int = knob(64, "samples per shard (COCO: 1000, ~160 MB shards)", ge=1)
    max_bytes: int = knob(64_000_000, "shard byte budget; a shard closes at whichever limit comes first", ge=1_000)
    seed: int = knob(0, "write-time shuffle", ge=0, le=SEED_MAX)
    workers: int = knob(2, "parallel shard writers (and --verify readers)", ge=1, le=MAX_WORKERS)
    verify: bool = knob(True, "re-read every shard after writing and check it against the manifest (one extra read)")
    url: str = knob("", "shard root in object storage (fsspec URL, e.g. s3://bucket/prefix; s3:// needs pip install "
                        "-e '.[stack]'): shard writes data/shards as ever, then uploads it there (index.json last); "
                        "stages given the default --shards data/shards read from it; \"\" = the local data/shards")

    @model_validator(mode="after")
    def _check(self) -> "ShardConfig":
        if self.url and ("://" not in self.url or self.url.split("://", 1)[1].strip("/") == ""):
            raise ValueError(f"url={self.url!r} must be an fsspec URL with a bucket/folder (e.g. s3://bucket/shards), "
                             "or \"\" for the local data/shards")
        return self
