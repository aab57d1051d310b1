"""Typed, validated sections of ``params.yaml``.

Every stage reads exactly one section (plus ``tracking``) through :func:`load_section`. Hyper-parameters live only in
``params.yaml``; paths live only in ``dvc.yaml``. Unknown keys, wrong types, out-of-range values and impossible
combinations are rejected *before any work starts* with one line naming the key, the value and what is allowed,
e.g. ``params.yaml: pretrain.batch_size=100 is not divisible by world size 8``.

Stage owners add their fields here; each field's default mirrors ``params.yaml`` (the CPU demo) and the paper's value
is given in the field's description where it differs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from components.errors import UserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PARAMS = Path(os.environ.get("SLOTCON_PARAMS", "params.yaml"))


class ConfigError(UserError, ValueError):
    """A bad ``params.yaml`` value: the message is one line naming the key, the value and what is allowed."""


class Section(BaseModel):
    """Base of all sections: frozen, strict about unknown keys and types (no silent str->int coercion)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)


# --------------------------------------------------------------------------------------------------------------------
# tracking
# --------------------------------------------------------------------------------------------------------------------
class TrackingConfig(Section):
    enabled: bool = True  # switch MLflow off entirely (e.g. quick local debugging)
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI overrides; file stores are deprecated in MLflow 3
    artifact_location: str = "mlartifacts"  # explicit local artifact root for the experiment (relative to the repo)
    experiment: str = Field(default="slotcon-pipeline", min_length=1)
    registered_model: str = Field(default="slotcon-backbone", min_length=1)


# --------------------------------------------------------------------------------------------------------------------
# data: which source, and the generated scenes
# --------------------------------------------------------------------------------------------------------------------
class ScenesConfig(Section):
    seed: int = 0  # everything generated derives from it: same seed -> byte-identical files
    num_train: int = Field(default=192, ge=1)  # demo size; enough images for 2-core CPU epochs in seconds
    num_val: int = Field(default=48, ge=1)
    image_size: int = Field(default=128, ge=32, le=1024)  # square images; COCO's are ~640x480
    min_objects: int = Field(default=2, ge=1)  # scene-centric: several objects per image, as in COCO (~7 on average)
    max_objects: int = Field(default=5, ge=1)
    num_thing_classes: int = Field(default=6, ge=1, le=12)  # "things": shape + texture define a class
    num_stuff_classes: int = Field(default=3, ge=1, le=8)  # "stuff" backgrounds, labelled in the semantic maps
    min_object_frac: float = Field(default=0.15, gt=0.0, le=1.0)  # object size as a fraction of the image side
    max_object_frac: float = Field(default=0.45, gt=0.0, le=1.0)
    jpeg_quality: int = Field(default=90, ge=50, le=100)

    @model_validator(mode="after")
    def _check(self) -> "ScenesConfig":
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects={self.min_objects} must be <= max_objects={self.max_objects}")
        if self.min_object_frac > self.max_object_frac:
            raise ValueError(f"min_object_frac={self.min_object_frac} must be <= max_object_frac={self.max_object_frac}")
        return self


class DataConfig(Section):
    source: Literal["scenes", "coco", "cocoplus"] = "scenes"  # scenes = generated offline default
    coco_root: str = ""  # a COCO root as COCO ships it (train2017/, val2017/, annotations/, unlabeled2017/)
    workers: int = Field(default=2, ge=1)  # processes that hash/decode-check images in `prepare`

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source in ("coco", "cocoplus") and not self.coco_root:
            raise ValueError(f"source={self.source!r} needs data.coco_root (the folder holding train2017/ and annotations/)")
        return self


class ShardConfig(Section):
    max_count: int = Field(default=64, ge=1)  # samples per shard (COCO: ~1000 -> ~160 MB shards)
    max_bytes: int = Field(default=64_000_000, ge=1_000)  # shard byte budget; a shard closes at whichever comes first
    seed: int = 0  # write-time shuffle
    workers: int = Field(default=2, ge=1)  # parallel shard writers


# --------------------------------------------------------------------------------------------------------------------
# pretrain / export
# --------------------------------------------------------------------------------------------------------------------
class PretrainConfig(Section):
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"  # paper: resnet50
    image_size: int = Field(default=64, ge=32)  # paper: 224; the demo uses small crops for CPU speed
    batch_size: int = Field(default=32, ge=2)  # global batch over all ranks; paper: 512 (COCO)
    epochs: int = Field(default=3, ge=1)  # paper: 800 (COCO / COCO+)
    warmup_epochs: int = Field(default=1, ge=0)  # paper: 5
    base_lr: float = Field(default=1.0, gt=0)  # lr = base_lr * global_batch / 256 (paper: 1.0 with LARS)
    min_lr: float = Field(default=1e-6, ge=0)  # cosine floor
    weight_decay: float = Field(default=1e-5, ge=0)  # paper: 1e-5
    optimizer: Literal["lars", "sgd", "adamw"] = "lars"  # paper: LARS (eta=0.001)
    num_prototypes: int = Field(default=32, ge=2)  # K; paper: 256 (COCO), 2048 (ImageNet)
    dim_hidden: int = Field(default=256, ge=8)  # projector/predictor hidden size; paper: 4096
    dim_out: int = Field(default=64, ge=8)  # D; paper: 256
    teacher_momentum: float = Field(default=0.99, ge=0, le=1)  # m0 of the cosine EMA schedule; paper: 0.99
    teacher_temp: float = Field(default=0.07, gt=0)  # tau_t; paper: 0.07
    student_temp: float = Field(default=0.1, gt=0)  # tau_s; paper: 0.1
    center_momentum: float = Field(default=0.9, ge=0, lt=1)  # paper: 0.9
    slot_temp: float = Field(default=0.2, gt=0)  # InfoNCE temperature; paper: 0.2
    group_loss_weight: float = Field(default=0.5, ge=0, le=1)  # lambda; paper: 0.5
    seed: int = 0
    num_workers: int = Field(default=2, ge=0)  # loader workers per rank: read shards and draw crop params only
    nproc_per_node: int = Field(default=1, ge=1)  # >1 -> the stage launches torch.distributed.run itself
    nnodes: int = Field(default=1, ge=1)
    amp: bool = True  # bf16 autocast on CUDA; ignored (fp32) on CPU
    channels_last: bool = True
    compile: bool = False  # torch.compile the encoders
    save_every_steps: int = Field(default=50, ge=1)  # atomic checkpoint cadence (plus every epoch end)
    log_every_steps: int = Field(default=5, ge=1)
    samples_per_epoch: int = Field(default=0, ge=0)  # 0 = the number of images in the pretraining shards

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        world = self.nproc_per_node * self.nnodes
        if self.batch_size % world:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by world size {world}")
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be < epochs={self.epochs}")
        if self.min_lr > self.base_lr:
            raise ValueError(f"min_lr={self.min_lr} must be <= base_lr={self.base_lr}")
        return self


class ExportConfig(Section):
    register_model: bool = True  # register the backbone as a new version of tracking.registered_model


# --------------------------------------------------------------------------------------------------------------------
# downstream
# --------------------------------------------------------------------------------------------------------------------
InitKind = str  # "random" | "pretrained" | a path to a backbone .pt


def _check_init(value: str) -> None:
    if value not in ("random", "pretrained") and not value.endswith(".pt"):
        raise ValueError(f"init={value!r} must be 'random', 'pretrained' or a path to a backbone .pt file")


class DetectConfig(Section):
    init: InitKind = "pretrained"
    compare_random: bool = True  # also train from random init with the same schedule, so the gain is visible
    norm: Literal["bn", "syncbn", "frozen"] = "bn"  # SSL transfer protocol: SyncBN under DDP, BN on one device
    iters: int = Field(default=60, ge=1)  # COCO 1x: 90000 at batch 16
    batch_size: int = Field(default=4, ge=1)  # COCO 1x: 16
    lr: float = Field(default=0.02, gt=0)  # COCO 1x: 0.02 at batch 16
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_iters: int = Field(default=10, ge=0)  # COCO 1x: 1000
    steps: list[int] = Field(default_factory=lambda: [40, 53])  # lr x0.1 at these iters; COCO 1x: [60000, 80000]
    min_size: list[int] = Field(default_factory=lambda: [128])  # train short side(s), multi-scale; COCO: 640..800
    max_size: int = Field(default=256, ge=32)  # COCO: 1333
    test_size: int = Field(default=128, ge=32)  # COCO: 800
    num_workers: int = Field(default=0, ge=0)
    nproc_per_node: int = Field(default=1, ge=1)
    seed: int = 0
    amp: bool = True
    num_vis: int = Field(default=4, ge=0)  # val images drawn with predictions

    @model_validator(mode="after")
    def _check(self) -> "DetectConfig":
        _check_init(self.init)
        if any(s >= self.iters for s in self.steps) or list(self.steps) != sorted(self.steps):
            raise ValueError(f"steps={self.steps} must be increasing and < iters={self.iters}")
        return self


class SegmentConfig(Section):
    init: InitKind = "pretrained"
    compare_random: bool = True
    dataset: Literal["auto", "scenes", "cocostuff", "voc", "cityscapes", "ade20k"] = "auto"
    data_root: str = ""  # empty = the scenes shards; else a dataset folder detected by its layout
    output_stride: Literal[8, 16] = 16  # mmseg fcn_r50-d8 uses 8
    iters: int = Field(default=60, ge=1)  # mmseg VOC: 20k/40k at batch 16
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=0.01, gt=0)  # mmseg: 0.01, poly power 0.9
    power: float = Field(default=0.9, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    crop_size: int = Field(default=96, ge=32)  # mmseg VOC: 512
    num_workers: int = Field(default=0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "SegmentConfig":
        _check_init(self.init)
        return self


class UnsupConfig(Section):
    resolution: int = Field(default=128, ge=32)  # PiCIE protocol on COCO-Stuff-27: 320
    compare_random: bool = True
    batch_size: int = Field(default=16, ge=1)


class VizConfig(Section):
    num_images: int = Field(default=6, ge=1)  # val images shown beside their prototype maps
    top_prototypes: int = Field(default=6, ge=1)  # most used prototypes in the concept figure
    num_neighbors: int = Field(default=5, ge=1)  # nearest segments per prototype (paper: 5)


SECTIONS: dict[str, type[Section]] = {
    "tracking": TrackingConfig,
    "scenes": ScenesConfig,
    "data": DataConfig,
    "shard": ShardConfig,
    "pretrain": PretrainConfig,
    "export": ExportConfig,
    "detect": DetectConfig,
    "segment": SegmentConfig,
    "unsup": UnsupConfig,
    "viz": VizConfig,
}


def _format_error(path: Path, section: str, raw: dict[str, Any], err: ValidationError) -> str:
    """One line: file, dotted key, value, what is allowed."""
    e = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        allowed = ", ".join(SECTIONS[section].model_fields)
        return f"{path}: unknown key {section}.{loc} (allowed: {allowed})"
    if not loc:  # a whole-section (combination) check
        return f"{path}: {section}.{msg}"
    value = raw.get(e["loc"][0], "<missing>")
    return f"{path}: {section}.{loc}={value!r} is invalid: {msg}"


def read_params(path: str | os.PathLike = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the repository root, or pass --params)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown} (allowed: {', '.join(SECTIONS)})")
    return data


def parse_section(section: str, raw: dict[str, Any] | None, path: str | os.PathLike = DEFAULT_PARAMS) -> Section:
    if section not in SECTIONS:
        raise ConfigError(f"{path}: no such section {section!r} (allowed: {', '.join(SECTIONS)})")
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: section {section} must be a mapping, got {type(raw).__name__}")
    try:
        return SECTIONS[section].model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(Path(path), section, raw, err)) from None


def load_section(section: str, path: str | os.PathLike = DEFAULT_PARAMS):
    """Load and validate one section of ``params.yaml``; raises :class:`ConfigError` with a one-line message."""
    return parse_section(section, read_params(path).get(section), path)


def load_all(path: str | os.PathLike = DEFAULT_PARAMS) -> dict[str, Section]:
    """Validate every section (used by ``slotcon check`` and the Prefect flow before any stage runs)."""
    data = read_params(path)
    return {name: parse_section(name, data.get(name), path) for name in SECTIONS}
