"""Typed, validated sections of ``params.yaml``.

Every stage reads exactly one section (plus ``tracking``) through :func:`load_section`. Hyper-parameters live only in
``params.yaml``; paths live only in ``dvc.yaml``. Unknown keys, wrong types, out-of-range values and impossible
combinations are rejected *before any work starts* with one line naming the key, the value and what is allowed,
e.g. ``params.yaml: pretrain.batch_size=100 is not divisible by world size 8``.

Stage owners add their fields here; each field's default mirrors ``params.yaml`` (the CPU demo) and the paper's value
is given in the field's description where it differs.

One file on purpose (over the house's 450-line mark): it is the whole ``params.yaml`` schema, one class per section
in the file's order, so a reader finds any key's type, bound and paper value in one place, and ``test_config`` checks
every default against ``params.yaml`` from here.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from components.constants import RESNET_ARCHS, VIT_ARCHS, VIT_SPECS
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
    seed: int = Field(default=0, ge=0)  # image i is drawn from default_rng([seed, id]): same seed -> identical bytes
    num_train: int = Field(default=192, ge=1, le=10_000_000)  # demo size; val ids start at 10_000_001 (no collision)
    num_val: int = Field(default=48, ge=1, le=10_000_000)
    image_size: int = Field(default=128, ge=32, le=1024)  # square images; COCO's are ~640x480
    min_objects: int = Field(default=2, ge=1)  # scene-centric: several objects per image, as in COCO (~7 on average)
    max_objects: int = Field(default=5, ge=1, le=98)  # annotation id = image_id * 100 + k stays < 2**31
    num_thing_classes: int = Field(default=6, ge=1, le=24)  # "things": shape + texture define a class; 13-24: the
    # "more classes" variant (new shapes and textures; the first 12 are the demo's)
    num_stuff_classes: int = Field(default=3, ge=1, le=16)  # "stuff" backgrounds, labelled in the semantic maps; 9-16:
    # the "more classes" variant
    min_object_frac: float = Field(default=0.15, gt=0.0, le=1.0)  # object size as a fraction of the image side
    max_object_frac: float = Field(default=0.45, gt=0.0, le=1.0)
    clutter_shapes: int = Field(default=0, ge=0, le=64)  # "harder" variant: unannotated distractor blobs/sticks per
    # image at random depths (occluding objects), labelled as a "clutter" stuff class in the semantic maps; 0 = off
    object_spread: float = Field(default=1.0, gt=0.0, le=1.0)  # "harder" variant: object centres spread over this
    # fraction of the image around a per-image focus point (< 1: objects pile up, heavy occlusion); 1 = off
    jpeg_quality: int = Field(default=90, ge=50, le=100)
    workers: int = Field(default=1, ge=1)  # processes drawing images; same bytes for any value (demo: 1 is fastest)

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

    source: Literal["scenes", "coco", "cocoplus", "imagenet", "folder"] = "scenes"  # scenes = generated offline default
    coco_root: str = ""  # a COCO root as COCO ships it (train2017/, val2017/, annotations/, unlabeled2017/)
    root: str = ""  # imagenet: the folder holding train/<wnid>/ and val/; folder: any tree of images
    include: list[str] = Field(default_factory=lambda: ["**"])  # e.g. ["train/n01*/**"] (a class subset)
    exclude: list[str] = Field(default_factory=list)  # e.g. ["**/thumbnails/**", "**/*_mask.png"]
    # Images that are not JPEG (PNG, WebP, BMP, TIFF, GIF; 16-bit/palette/alpha PNGs). transcode: decoded once at
    # shard time and stored as JPEG (transcode_quality, 4:4:4, EXIF orientation applied): one lossy generation, but
    # every training path (libjpeg-turbo on CPU, nvJPEG batch decode on GPU) then reads every sample at full speed.
    # skip: such files are counted (reason not_jpeg) and left out, for collections where they are noise (masks, plots).
    # Keeping their own bytes is not offered: nvJPEG can't decode them and the CPU fallback would be ~5x slower.
    # JPEGs that decoders would show differently (EXIF orientation != 1, CMYK/YCCK) are transcoded under both.
    non_jpeg: Literal["transcode", "skip"] = "transcode"
    transcode_quality: int = Field(default=95, ge=70, le=100)  # JPEG quality of transcoded images
    duplicates: Literal["skip", "keep"] = "skip"  # images with the same bytes as an earlier one in the split: skip
    # (counted, reason duplicate) or keep; either way every pair is listed in the manifest metadata
    workers: int = Field(default=2, ge=1)  # processes that hash/decode-check images in `prepare`

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
    max_count: int = Field(default=64, ge=1)  # samples per shard (COCO: ~1000 -> ~160 MB shards)
    max_bytes: int = Field(default=64_000_000, ge=1_000)  # shard byte budget; a shard closes at whichever comes first
    seed: int = 0  # write-time shuffle
    workers: int = Field(default=2, ge=1)  # parallel shard writers (and --verify readers)
    verify: bool = True  # re-read every shard after writing and check it against the manifest (one extra read)


# --------------------------------------------------------------------------------------------------------------------
# pretrain / export
# --------------------------------------------------------------------------------------------------------------------
class SlotConParams(Section):
    """``pretrain.slotcon``: the SlotCon model and its optimiser (paper values in comments)."""

    arch: Literal[RESNET_ARCHS] = "resnet18"  # paper: resnet50
    optimizer: Literal["lars", "sgd", "adamw"] = "lars"  # paper: LARS (eta=0.001)
    base_lr: float = Field(default=1.0, gt=0)  # lr = base_lr * global_batch / 256 (paper: 1.0 with LARS)
    min_lr: float = Field(default=1e-6, ge=0)  # cosine floor
    weight_decay: float = Field(default=1e-5, ge=0)  # paper: 1e-5
    num_prototypes: int = Field(default=32, ge=2)  # K; paper: 256 (COCO), 2048 (ImageNet)
    dim_hidden: int = Field(default=256, ge=8)  # projector/predictor hidden size; paper: 4096
    dim_out: int = Field(default=64, ge=8)  # D; paper: 256
    teacher_momentum: float = Field(default=0.99, ge=0, le=1)  # m0 of the cosine EMA schedule; paper: 0.99
    teacher_temp: float = Field(default=0.07, gt=0)  # tau_t; paper: 0.07
    student_temp: float = Field(default=0.1, gt=0)  # tau_s; paper: 0.1
    center_momentum: float = Field(default=0.9, ge=0, lt=1)  # paper: 0.9
    slot_temp: float = Field(default=0.2, gt=0)  # InfoNCE temperature; paper: 0.2
    group_loss_weight: float = Field(default=0.5, ge=0, le=1)  # lambda; paper: 0.5

    @model_validator(mode="after")
    def _check(self) -> "SlotConParams":
        if self.min_lr > self.base_lr:
            raise ValueError(f"min_lr={self.min_lr} must be <= base_lr={self.base_lr}")
        return self


class SimParams(Section):
    """``pretrain.sim``: SIM (Siamese Image Modeling) on a plain ViT and its optimiser. Defaults: the CPU demo; the
    released ViT-B/16 recipe (configs/pretrain/dist_sim_base_1600ep.sh) in comments."""

    arch: Literal[VIT_ARCHS] = "vit_demo_16"  # paper: vit_b_16
    optimizer: Literal["adamw"] = "adamw"  # paper: AdamW
    base_lr: float = Field(default=1.5e-3, gt=0)  # lr = base_lr * global_batch / 256; paper: 6.25e-5 (batch 4096)
    min_lr: float = Field(default=1e-6, ge=0)  # cosine floor; paper: 0
    weight_decay: float = Field(default=0.05, ge=0)  # paper: 0.05 (none on norms, biases, positions, tokens)
    beta2: float = Field(default=0.95, gt=0, lt=1)  # AdamW beta2; paper: 0.95
    clip_grad: float = Field(default=1.0, ge=0)  # global grad-norm clip (0 = off); paper: 1.0
    teacher_momentum: float = Field(default=0.995, ge=0, le=1)  # m0 of the cosine EMA schedule to 1; paper: 0.995
    mask_ratio: float = Field(default=0.6, gt=0, lt=1)  # block-masked share of view A; paper: 118/196 = 0.602
    decoder_dim: int = Field(default=192, ge=8)  # decoder_embed/projector/predictor width; paper: 768
    decoder_heads: int = Field(default=6, ge=1)  # paper: 16
    projector_depth: int = Field(default=1, ge=0)  # blocks; paper: 2
    predictor_depth: int = Field(default=2, ge=1)  # blocks; paper: 4
    norm: Literal["bn", "ln"] = "bn"  # norm of projector/predictor blocks; paper: bn (its ablation prefers BN)
    neg_weight: float = Field(default=0.02, ge=0)  # UniGrad lambda; paper: 0.02
    global_weight: float = Field(default=1.0, ge=0)  # alpha1, global term; paper: 1 (short schedules), code: 0
    dense_weight: float = Field(default=4.0, gt=0)  # alpha2, dense term; paper: 4 (short schedules), code: 1
    online_ln: bool = False  # LayerNorm the predictions too (the targets always are); released code: false
    train_patch_embed: bool = False  # released code: the patch projection stays at its random init (MoCo v3)

    @model_validator(mode="after")
    def _check(self) -> "SimParams":
        if self.min_lr > self.base_lr:
            raise ValueError(f"min_lr={self.min_lr} must be <= base_lr={self.base_lr}")
        if self.decoder_dim % 4 or self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim={self.decoder_dim} must be a multiple of 4 (2-D sin-cos positions) and "
                             f"of decoder_heads={self.decoder_heads}")
        return self


class MocoV2Params(Section):
    """``pretrain.mocov2``: MoCo v2, the image-level baseline (paper values in comments; Chen et al. 2020)."""

    arch: Literal[RESNET_ARCHS] = "resnet18"  # paper: resnet50
    optimizer: Literal["sgd", "lars", "adamw"] = "sgd"  # paper: SGD, momentum 0.9
    base_lr: float = Field(default=0.24, gt=0)  # lr = base_lr * global_batch / 256 (0.03 at the demo's 32); paper: 0.03
    min_lr: float = Field(default=0.0, ge=0)  # cosine floor; paper: 0
    weight_decay: float = Field(default=1e-4, ge=0)  # paper: 1e-4
    dim_hidden: int = Field(default=512, ge=8)  # MLP head hidden width; paper: 2048 (= the R50 trunk's channels)
    dim: int = Field(default=128, ge=8)  # embedding size; paper: 128
    queue_size: int = Field(default=128, ge=2)  # negatives; a multiple of batch_size, below the images per epoch
    # (else an image meets its own older keys as negatives); paper: 65536
    temperature: float = Field(default=0.2, gt=0)  # tau; paper: 0.2
    key_momentum: float = Field(default=0.99, ge=0, le=1)  # constant; paper: 0.999 (1000-step time constant: too
    # slow for a demo of tens of steps)
    bn_splits: int = Field(default=2, ge=1)  # BatchNorm groups per process (shuffle BN needs >= 2 groups in all);
    # paper: 1 per GPU over 8 GPUs

    @model_validator(mode="after")
    def _check(self) -> "MocoV2Params":
        if self.min_lr > self.base_lr:
            raise ValueError(f"min_lr={self.min_lr} must be <= base_lr={self.base_lr}")
        return self


class PretrainConfig(Section):
    """``pretrain``: what every method shares (data, schedule length, processes, speed knobs) plus one subsection per
    method; ``method`` picks which subsection is used (the others are validated but change nothing)."""

    method: Literal["slotcon", "sim", "mocov2"] = "slotcon"
    image_size: int = Field(default=96, ge=32)  # paper: 224; small demo crops for CPU speed, but a 3x3 map so slots are kept
    batch_size: int = Field(default=32, ge=2)  # global batch over all ranks; paper: 512 (COCO)
    epochs: int = Field(default=3, ge=1)  # paper: 800 (COCO / COCO+)
    warmup_epochs: int = Field(default=1, ge=0)  # paper: 5
    seed: int = 0
    num_workers: int = Field(default=1, ge=0)  # loader workers per rank: read shards, draw crop boxes (+ CPU decode)
    nproc_per_node: int = Field(default=1, ge=1)  # >1 -> the stage launches torch.distributed.run itself
    nnodes: int = Field(default=1, ge=1)
    amp: bool = True  # bf16 autocast on CUDA; ignored (fp32) on CPU
    channels_last: bool = True
    compile: bool = False  # torch.compile the encoders
    save_every_steps: int = Field(default=50, ge=1)  # atomic checkpoint cadence (plus every epoch end)
    log_every_steps: int = Field(default=5, ge=1)  # host looks at the step stats (MLflow, non-finite check)
    samples_per_epoch: int = Field(default=0, ge=0)  # 0 = the number of images in the pretraining shards
    # stop (one line, every rank) when more than this share of the shards' samples is lost (damaged tar, corrupt
    # JPEG ...; counted against index.json); 0 = any loss stops
    max_lost_fraction: float = Field(default=0.001, ge=0.0, le=1.0)
    slotcon: SlotConParams = Field(default_factory=SlotConParams)
    sim: SimParams = Field(default_factory=SimParams)
    mocov2: MocoV2Params = Field(default_factory=MocoV2Params)

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        world = self.nproc_per_node * self.nnodes
        if self.batch_size % world:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by world size {world}")
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be < epochs={self.epochs}")
        if self.method == "sim" and self.image_size % VIT_SPECS[self.sim.arch]["patch_size"]:
            raise ValueError(f"image_size={self.image_size} is not a multiple of {self.sim.arch}'s patch size "
                             f"{VIT_SPECS[self.sim.arch]['patch_size']} (method sim)")
        return self

    @property
    def method_params(self) -> Section:
        """The subsection of the chosen method."""
        return getattr(self, self.method)

    @property
    def arch(self) -> str:
        return self.method_params.arch


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
    """Mask R-CNN FPN fine-tuning (stage ``detect``). Defaults: the CPU demo; the paper's COCO 1x values in comments
    (detectron2 ``mask_rcnn_R_50_FPN_1x`` with SyncBN, as SlotCon/MoCo transfer: 90k iterations at batch 16, lr 0.02,
    steps 60k/80k, warm-up 1000 from lr/1000, short side 640-800 (step 32), max 1333, test 800)."""

    init: InitKind = "pretrained"  # random | pretrained (--backbone) | path/to/backbone.pt
    compare_random: bool = True  # also train from random init with the same schedule, so the gain is visible
    norm: Literal["bn", "syncbn", "frozen"] = "syncbn"  # SSL protocol: SyncBN under DDP (GPUs), BN on one device
    box_head: Literal["2fc", "4conv1fc"] = "2fc"  # 2fc: torchvision v1 (fast); 4conv1fc+norm: the SSL configs
    iters: int = Field(default=40, ge=1)  # demo: ~2 min for both inits on a CPU; COCO 1x: 90000 at batch 16
    batch_size: int = Field(default=4, ge=1)  # global, over all ranks; COCO 1x: 16
    lr: float = Field(default=0.02, gt=0)  # COCO 1x: 0.02 at batch 16
    momentum: float = Field(default=0.9, ge=0, lt=1)  # COCO 1x: 0.9
    weight_decay: float = Field(default=1e-4, ge=0)  # COCO 1x: 1e-4 (none on norm parameters)
    warmup_iters: int = Field(default=10, ge=0)  # linear from lr/1000; COCO 1x: 1000
    steps: list[int] = Field(default_factory=lambda: [27, 36])  # lr x0.1 at 2/3 and 8/9 of iters; COCO 1x: [60000, 80000]
    min_size: list[int] = Field(default_factory=lambda: [96, 112, 128], min_length=1)  # train short side drawn per
    # image; COCO 1x: [640, 672, 704, 736, 768, 800]
    max_size: int = Field(default=256, ge=32)  # longest side cap; COCO: 1333
    test_size: int = Field(default=128, ge=32)  # COCO: 800
    rpn_batch_size: int = Field(default=64, ge=2)  # anchors sampled per image for the RPN loss; COCO: 256
    roi_batch_size: int = Field(default=64, ge=2)  # proposals sampled per image for the ROI heads; COCO: 512
    proposals_train: int = Field(default=500, ge=1)  # RPN proposals kept after NMS in training; COCO: 2000
    proposals_test: int = Field(default=300, ge=1)  # in evaluation; COCO: 1000
    mask_head: list[int] = Field(default_factory=lambda: [128, 128], min_length=1)  # widths of the mask head's 3x3
    # convs (the CPU step's biggest cost); COCO: [256, 256, 256, 256]
    detections_per_img: int = Field(default=50, ge=1)  # kept per val image; COCO: 100
    num_workers: int = Field(default=0, ge=0)  # loader workers per rank
    nproc_per_node: int = Field(default=1, ge=1)  # >1: the stage launches torch.distributed.run itself
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA; fp32 on CPU
    save_every: int = Field(default=20, ge=1)  # resumable checkpoint cadence (iterations), with --checkpoints
    num_vis: int = Field(default=4, ge=0)  # val images drawn with predictions
    log_model: bool = True  # log the fine-tuned detector to MLflow (not registered)

    @model_validator(mode="after")
    def _check(self) -> "DetectConfig":
        _check_init(self.init)
        if any(s >= self.iters for s in self.steps) or list(self.steps) != sorted(self.steps):
            raise ValueError(f"steps={self.steps} must be increasing and < iters={self.iters}")
        if any(s < 32 for s in self.min_size) or max(self.min_size) > self.max_size:
            raise ValueError(f"min_size={self.min_size} must be >= 32 and <= max_size={self.max_size}")
        if self.batch_size % self.nproc_per_node:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by nproc_per_node={self.nproc_per_node}")
        return self


class SemiSupParams(Section):
    """``segment.semisup``: the mean teacher and the mixing shared by ``classmix`` and ``reco`` (ReCo's values)."""

    mix: Literal["classmix", "cutmix"] = "classmix"  # one mask per image pair for images, pseudo-labels, confidences
    unlabeled_batch_size: int = Field(default=0, ge=0)  # global, per step; 0 = batch_size. ReCo VOC: 10 + 10
    strong_threshold: float = Field(default=0.97, gt=0, le=1)  # unsup CE weight = share of pixels >= this; ReCo: 0.97
    ema_max: float = Field(default=0.99, ge=0, lt=1)  # teacher momentum min(1 - 1/(t+1), ema_max); ReCo: 0.99
    unsup_weight: float = Field(default=1.0, ge=0)  # ReCo: 1
    color_jitter: bool = True  # brightness/contrast/saturation 0.75-1.25 (p 0.8) on the mixed batch; ReCo: + hue, blur


class ReCoParams(Section):
    """``segment.reco``: the regional contrast loss (Liu et al., ICLR 2022; paper values)."""

    rep_dim: int = Field(default=256, ge=8)  # representation head output; paper: 256
    temperature: float = Field(default=0.5, gt=0)  # tau; paper: 0.5
    num_queries: int = Field(default=256, ge=1)  # hard queries per class, drawn with replacement; paper: 256
    num_negatives: int = Field(default=512, ge=1)  # negative keys per query; paper: 512
    hard_threshold: float = Field(default=0.97, gt=0, le=1)  # delta_s: a query is hard when prob_c < this; paper: 0.97
    weak_threshold: float = Field(default=0.7, ge=0, le=1)  # delta_w: unlabelled pixels used when conf >= this; 0.7
    weight: float = Field(default=1.0, ge=0)  # paper: 1


SEGMENT_METHODS = ("supervised", "classmix", "reco")


class SegmentConfig(Section):
    init: InitKind = "pretrained"
    compare_random: bool = True
    dataset: Literal["auto", "scenes", "cocostuff", "voc", "cityscapes", "ade20k"] = "auto"
    data_root: str = ""  # empty = the scenes shards; else a dataset folder detected by its layout
    # supervised: fine-tune on the labelled images; classmix: + mean teacher on the unlabelled ones (ClassMix/CutMix);
    # reco: classmix + ReCo's regional contrast (arXiv 2104.04465)
    method: Literal[SEGMENT_METHODS] = "supervised"
    # images that keep their labels: an integer is a count, a number with a decimal point a fraction (1.0 = all); the
    # rest of the train split is used without labels. Drawn from split_seed (uniformly: the labels are never read)
    labeled: int | float = 1.0
    split_seed: int = 0
    head: Literal["auto", "fcn", "deeplabv3plus"] = "auto"  # auto: fcn for supervised (SlotCon's protocol), else
    # deeplabv3plus (ReCo's); the supervised baseline of a semi-supervised run always gets the run's head
    compare_supervised: bool = True  # semi-supervised methods: also train supervised on the same labelled images
    output_stride: Literal[8, 16] = 16  # mmseg fcn_r50-d8 uses 8; ReCo's DeepLabv3+: 16
    iters: int = Field(default=60, ge=1)  # mmseg VOC: 20k/40k at batch 16; ReCo: 40k
    batch_size: int = Field(default=8, ge=1)  # labelled images per step (global); mmseg: 16, ReCo: 10
    lr: float = Field(default=0.01, gt=0)  # mmseg: 0.01, poly power 0.9; ReCo: 2.5e-3
    power: float = Field(default=0.9, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False  # ReCo: true
    weight_decay: float = Field(default=5e-4, ge=0)
    crop_size: int = Field(default=96, ge=32)  # mmseg VOC: 512; ReCo VOC: 321
    scale_range: list[float] = Field(default_factory=lambda: [0.5, 2.0])  # random rescale ratio; mmseg: [0.5, 2.0]
    head_channels: int = Field(default=128, ge=8)  # FCN head width (mmseg R50: 512); DeepLabv3+'s ASPP and decoder
    # width (ReCo: 256)
    num_convs: int = Field(default=2, ge=0)  # 3x3 conv-BN-ReLU in the head; mmseg: 2
    concat_input: bool = True  # concat the trunk output back before the classifier; mmseg FCN: true
    aux_weight: float = Field(default=0.4, ge=0)  # auxiliary FCN head on layer3; mmseg: 0.4 (0 = no aux head)
    test_mode: Literal["whole", "slide"] = "whole"  # slide: crop_size windows, 2/3 overlap (mmseg Cityscapes)
    num_workers: int = Field(default=0, ge=0)
    nproc_per_node: int = Field(default=1, ge=1)  # >1: the stage launches torch.distributed.run itself (DDP)
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA; fp32 on CPU
    save_every: int = Field(default=20, ge=1)  # resumable checkpoint cadence (iterations), with --checkpoints
    num_vis: int = Field(default=4, ge=0)  # val images in the prediction picture
    semisup: SemiSupParams = Field(default_factory=SemiSupParams)
    reco: ReCoParams = Field(default_factory=ReCoParams)

    @model_validator(mode="after")
    def _check(self) -> "SegmentConfig":
        _check_init(self.init)
        if self.batch_size % self.nproc_per_node:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by nproc_per_node={self.nproc_per_node}")
        if self.unlabeled_batch_size % self.nproc_per_node:
            raise ValueError(f"semisup.unlabeled_batch_size={self.unlabeled_batch_size} is not divisible by "
                             f"nproc_per_node={self.nproc_per_node}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range={self.scale_range} must be [min, max] with 0 < min <= max")
        if isinstance(self.labeled, bool) or (isinstance(self.labeled, int) and self.labeled < 1) or (
                isinstance(self.labeled, float) and not 0 < self.labeled <= 1):
            raise ValueError(f"labeled={self.labeled!r} must be a count >= 1 (an integer) or a fraction in (0, 1] "
                             "(a number with a decimal point, e.g. 0.05)")
        if self.method != "supervised" and isinstance(self.labeled, float) and self.labeled >= 1.0:
            raise ValueError(f"method={self.method!r} needs unlabelled images: set labeled to a count or a fraction "
                             "below 1.0 (e.g. labeled: 8)")
        if self.method == "reco" and self.head == "fcn":
            raise ValueError("method='reco' needs the representation head of head: deeplabv3plus (or auto)")
        return self

    @property
    def unlabeled_batch_size(self) -> int:
        return self.semisup.unlabeled_batch_size or self.batch_size

    @property
    def resolved_head(self) -> str:
        """``head`` with ``auto`` resolved by ``method``: FCN for supervised, DeepLabv3+ for the semi-supervised."""
        if self.head != "auto":
            return self.head
        return "fcn" if self.method == "supervised" else "deeplabv3plus"


class ProbeConfig(Section):
    """Frozen-trunk linear probes (stage ``probe``): a dense (semantic) and an object (box classification) probe."""

    init: InitKind = "pretrained"  # random | pretrained (--backbone) | path/to/backbone.pt
    arch: Literal[RESNET_ARCHS] = "resnet18"  # only for init: random (otherwise the backbone file names it)
    compare_random: bool = True  # also probe the same trunk randomly initialised (seed), so the gain is visible
    layers: list[Literal["layer2", "layer3", "layer4"]] = Field(default_factory=lambda: ["layer3", "layer4"],
                                                                 min_length=1)
    resolution: int = Field(default=256, ge=32)  # short side resize + centre crop (as unsup: 2x the 128 px scenes)
    label_size: int = Field(default=64, ge=8)  # the dense probe trains on logits upsampled to this size
    steps: int = Field(default=300, ge=1)  # AdamW steps of each linear classifier (cosine decay)
    lr: float = Field(default=0.01, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    probe_batch: int = Field(default=64, ge=1)  # images per dense-probe step
    batch_size: int = Field(default=16, ge=1)  # images per feature-extraction batch
    seed: int = 0  # classifier init and sampling (and the random trunk's init)

    @model_validator(mode="after")
    def _check(self) -> "ProbeConfig":
        _check_init(self.init)
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers={self.layers} lists a layer twice")
        return self


class UnsupConfig(Section):
    dataset: Literal["auto", "scenes", "cocostuff27", "cocostuff", "voc", "cityscapes", "ade20k"] = "auto"
    data_root: str = ""  # empty = the scenes shards' val split; a COCO-Stuff root -> COCO-Stuff-27 (PiCIE protocol)
    # short side resize + centre crop; PiCIE on COCO-Stuff-27: 320. The demo upsamples its 128 px scenes 2x so the
    # stride-32 teacher sees an 8x8 grid and objects near their pretraining scale (64 px crops of 128 px images)
    resolution: int = Field(default=256, ge=32)
    compare_random: bool = True  # same path from the same method's model randomly initialised, the baseline
    seed: int = 0  # init seed of that random baseline and of k-means
    batch_size: int = Field(default=16, ge=1)
    # clusters: auto = the method's prototypes if it has them (SlotCon), else k-means (K = classes) on its dense
    # features (MoCo, SIM); kmeans = k-means for every method (compares the features, not the prototypes)
    assign: Literal["auto", "kmeans"] = "auto"


class VizConfig(Section):
    num_images: int = Field(default=6, ge=1)  # val images shown beside their cluster maps
    top_prototypes: int = Field(default=6, ge=1)  # most used prototypes in the concept figure
    num_neighbors: int = Field(default=5, ge=1)  # nearest segments per prototype (paper: 5)
    resolution: int = Field(default=256, ge=32)  # short side resize + centre crop of the val images (as unsup)
    batch_size: int = Field(default=16, ge=1)
    num_clusters: int = Field(default=0, ge=0)  # k-means K for methods without prototypes; 0 = the semantic classes
    seed: int = 0  # k-means seed


SECTIONS: dict[str, type[Section]] = {
    "tracking": TrackingConfig,
    "scenes": ScenesConfig,
    "data": DataConfig,
    "shard": ShardConfig,
    "pretrain": PretrainConfig,
    "export": ExportConfig,
    "detect": DetectConfig,
    "segment": SegmentConfig,
    "probe": ProbeConfig,
    "unsup": UnsupConfig,
    "viz": VizConfig,
}


def _format_error(path: Path, section: str, raw: dict[str, Any], err: ValidationError) -> str:
    """One line: file, dotted key, value, what is allowed."""
    e = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        model: Any = SECTIONS[section]
        for part in e["loc"][:-1]:  # a nested subsection: list the fields of that level
            model = model.model_fields[part].annotation
        allowed = ", ".join(model.model_fields)
        return f"{path}: unknown key {section}.{loc} (allowed: {allowed})"
    if not loc:  # a whole-section (combination) check
        return f"{path}: {section}.{msg}"
    value: Any = raw
    for part in e["loc"]:
        value = value.get(part, "<missing>") if isinstance(value, dict) else "<missing>"
    if isinstance(value, dict):  # a combination check inside a subsection
        return f"{path}: {section}.{loc}.{msg}"
    return f"{path}: {section}.{loc}={value!r} is invalid: {msg}"


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two fixes for params files: ``1e-6`` is a float (YAML 1.2, as DVC's ruamel reads it;
    YAML 1.1 needs a dot and a signed exponent and would give the string ``'1e-6'``), and a key given twice in one
    mapping is an error instead of silently keeping the last value."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    first = seen[key]
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first.line + 1}); keep one",
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, path: str | os.PathLike) -> Any:
    """``text`` as YAML with :class:`_ParamsLoader`; a syntax error is one line ``path:LINE:COL: what is wrong``."""
    try:
        return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(filter(None, [exc.context, exc.problem])) or "invalid YAML"
        if isinstance(exc, yaml.constructor.ConstructorError):
            raise ConfigError(f"{where}: {what}") from None
        raise ConfigError(f"{where}: YAML syntax error: {what} (check indentation, ':' after each key, quotes)") \
            from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def read_params(path: str | os.PathLike = DEFAULT_PARAMS) -> dict[str, Any]:
    """The whole params file as a dict of sections (known section names only; sections not validated here)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the repository root, or pass --params)")
    data = parse_yaml(path.read_text(), path)
    if data is None:
        raise ConfigError(f"{path}: the file is empty; it needs the sections {', '.join(SECTIONS)} "
                          "(restore it with `git checkout -- params.yaml`)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS), key=str)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown} (allowed: {', '.join(SECTIONS)})")
    return data


def _missing(path: Path, names: list[str]) -> ConfigError:
    which = ", ".join(names)
    return ConfigError(f"{path}: section(s) {which} missing: each stage reads its own section and never falls back "
                       "to built-in defaults; add them (defaults: `git show HEAD:params.yaml`, paper recipes: "
                       "docs/presets/)")


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
    """Load and validate one section of ``params.yaml``; raises :class:`ConfigError` with a one-line message (also
    when the section is absent: a stage never runs on silent built-in defaults)."""
    data = read_params(path)
    if section in SECTIONS and section not in data:
        raise _missing(Path(path), [section])
    return parse_section(section, data.get(section), path)


def load_all(path: str | os.PathLike = DEFAULT_PARAMS, required: Iterable[str] | None = None) -> dict[str, Section]:
    """Validate every section present, and require ``required`` (default: all) to be present; used by ``slotcon
    check`` and the Prefect flow before any stage runs. Returns the validated sections, by name."""
    data = read_params(path)
    need = list(SECTIONS) if required is None else [s for s in SECTIONS if s in set(required)]
    missing = [s for s in need if s not in data]
    if missing:
        raise _missing(Path(path), missing)
    return {name: parse_section(name, data.get(name), path) for name in SECTIONS if name in data or name in need}
