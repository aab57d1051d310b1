"""The downstream sections of ``params.yaml``: ``detect`` (Mask R-CNN), ``segment`` (supervised or semi-supervised
semantic segmentation, with its ``semisup`` and ``reco`` subsections), ``probe`` (linear probes), ``unsup``
(unsupervised segmentation) and ``viz`` (pictures of the prototypes)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from components.config.schema import MAX_BATCH, MAX_PIXELS, MAX_WORKERS, SEED_MAX, MAX_STEPS, Section, knob
from components.constants import RESNET_ARCHS

InitKind = str  # "random" | "pretrained" | a path to a backbone .pt
_INIT_DOC = "random | pretrained (--backbone) | path/to/backbone.pt"


def _check_init(value: str) -> None:
    if value not in ("random", "pretrained") and not value.endswith(".pt"):
        raise ValueError(f"init={value!r} must be 'random', 'pretrained' or a path to a backbone .pt file")


def _lost_knob():
    """``max_lost_fraction`` of a stage that reads shards: pretraining's rule (same default) for its own splits."""
    return knob(0.001, "stop (one line naming the shard) when more than this share of a split's samples is lost "
                       "(damaged tar, corrupt JPEG ...; counted against index.json); 0 = any loss stops; below it "
                       "the details say how many were used", ge=0.0, le=1.0)


def _check_divisible(batch_size: int, nproc_per_node: int) -> None:
    if batch_size % nproc_per_node:
        raise ValueError(f"batch_size={batch_size} is not divisible by nproc_per_node={nproc_per_node}")


class DetectConfig(Section):
    """``detect``: Mask R-CNN FPN fine-tuning on the pretrained trunk. Defaults: the CPU demo; the paper's COCO 1x
    values in comments (detectron2 ``mask_rcnn_R_50_FPN_1x`` with SyncBN, as SlotCon/MoCo transfer: 90k iterations at
    batch 16, lr 0.02, steps 60k/80k, warm-up 1000 from lr/1000, short side 640-800 (step 32), max 1333, test 800)."""

    init: InitKind = knob("pretrained", _INIT_DOC)
    compare_random: bool = knob(True, "also train from random init with the same schedule, so the gain is visible",
                                resume_safe=True)
    norm: Literal["bn", "syncbn", "frozen"] = knob(
        "syncbn", "syncbn (SSL protocol: SyncBN over ranks under DDP on GPUs, train-mode BN on one device) | bn (never "
                  "synced) | frozen (torchvision's supervised default)")
    box_head: Literal["2fc", "4conv1fc"] = knob("2fc", "2fc (torchvision v1, fast) | 4conv1fc (normalised heads of "
                                                       "the SSL transfer configs)")
    iters: int = knob(40, "~1.4 s each on one CPU core, x2 inits: the demo stays near two minutes; COCO 1x: 90000 at "
                          "batch 16", ge=1, le=MAX_STEPS)
    batch_size: int = knob(4, "global, over all ranks; COCO 1x: 16", ge=1, le=MAX_BATCH)
    lr: float = knob(0.02, "COCO 1x: 0.02 at batch 16", gt=0)
    momentum: float = knob(0.9, "COCO 1x: 0.9", ge=0, lt=1)
    weight_decay: float = knob(1e-4, "COCO 1x: 1e-4; none on norm parameters (detectron2 WEIGHT_DECAY_NORM=0)", ge=0)
    warmup_iters: int = knob(10, "linear from lr/1000; COCO 1x: 1000", ge=0, le=MAX_STEPS)
    steps: list[int] = knob([27, 36], "lr x0.1 at 2/3 and 8/9 of iters (as 1x); COCO 1x: [60000, 80000]")
    min_size: list[int] = knob([96, 112, 128], "train short side drawn per image; COCO 1x: [640, 672, 704, 736, 768, "
                                               "800]", min_length=1)
    max_size: int = knob(256, "longest side cap; COCO: 1333", ge=32, le=MAX_PIXELS)
    test_size: int = knob(128, "COCO: 800", ge=32, le=MAX_PIXELS)
    rpn_batch_size: int = knob(64, "anchors sampled per image for the RPN loss; COCO: 256", ge=2)
    roi_batch_size: int = knob(64, "proposals sampled per image for the ROI heads; COCO: 512", ge=2)
    proposals_train: int = knob(500, "RPN proposals kept after NMS in training; COCO: 2000", ge=1)
    proposals_test: int = knob(300, "in evaluation; COCO: 1000", ge=1)
    mask_head: list[int] = knob([128, 128], "widths of the mask head's 3x3 convs (the CPU step's biggest cost); COCO: "
                                            "[256, 256, 256, 256]", min_length=1)
    detections_per_img: int = knob(50, "kept per val image; COCO: 100", ge=1)
    num_workers: int = knob(0, "loader workers per rank", ge=0, resume_safe=True, le=MAX_WORKERS)
    nproc_per_node: int = knob(1, ">1: the stage launches torch.distributed.run itself",
                               ge=1, resume_safe=True, le=MAX_WORKERS)
    seed: int = knob(0, ge=0, le=SEED_MAX)
    amp: bool = knob(True, "bf16 autocast on CUDA (fp32 on CPU)")
    save_every: int = knob(20, "resumable checkpoint cadence (iterations), with --checkpoints", ge=1, resume_safe=True)
    num_vis: int = knob(4, "val images drawn with predictions", ge=0, resume_safe=True)
    log_model: bool = knob(True, "log the fine-tuned detector to MLflow (not registered)", resume_safe=True)
    max_lost_fraction: float = _lost_knob()

    @model_validator(mode="after")
    def _check(self) -> "DetectConfig":
        _check_init(self.init)
        if any(s >= self.iters for s in self.steps) or list(self.steps) != sorted(self.steps):
            raise ValueError(f"steps={self.steps} must be increasing and < iters={self.iters}")
        if any(s < 32 for s in self.min_size) or max(self.min_size) > self.max_size:
            raise ValueError(f"min_size={self.min_size} must be >= 32 and <= max_size={self.max_size}")
        _check_divisible(self.batch_size, self.nproc_per_node)
        return self


class SemiSupParams(Section):
    """``segment.semisup``: the mean teacher and the mixing shared by ``classmix`` and ``reco`` (ReCo's values)."""

    mix: Literal["classmix", "cutmix"] = knob("classmix", "classmix | cutmix: one mask per image pair for images, "
                                                          "pseudo-labels, confidences")
    unlabeled_batch_size: int = knob(0, "unlabelled images per step (global); 0 = batch_size; ReCo VOC: 10 + 10",
                                     ge=0, le=MAX_BATCH)
    strong_threshold: float = knob(0.97, "unsup CE weight = share of pixels with teacher confidence >= this; ReCo: "
                                         "0.97", gt=0, le=1)
    ema_max: float = knob(0.99, "teacher momentum min(1 - 1/(t+1), ema_max); ReCo: 0.99", ge=0, lt=1)
    unsup_weight: float = knob(1.0, "ReCo: 1", ge=0)
    color_jitter: bool = knob(True, "brightness/contrast/saturation 0.75-1.25 (p 0.8) on the mixed batch; ReCo: + "
                                    "hue, blur")


class ReCoParams(Section):
    """``segment.reco``: the regional contrast loss (Liu et al., ICLR 2022; paper values; the CPU demo could lower
    queries/negatives)."""

    rep_dim: int = knob(256, "representation head output; paper: 256", ge=8)
    temperature: float = knob(0.5, "tau; paper: 0.5", gt=0)
    num_queries: int = knob(256, "hard queries per class, drawn with replacement; paper: 256", ge=1)
    num_negatives: int = knob(512, "negative keys per query; paper: 512", ge=1)
    hard_threshold: float = knob(0.97, "delta_s: a query is hard when prob_c < this; paper: 0.97", gt=0, le=1)
    weak_threshold: float = knob(0.7, "delta_w: unlabelled pixels with confidence >= this join; paper: 0.7", ge=0,
                                 le=1)
    weight: float = knob(1.0, "paper: 1", ge=0)


SEGMENT_METHODS = ("supervised", "classmix", "reco")


class SegmentConfig(Section):
    """``segment``: supervised FCN (SlotCon's protocol) or semi-supervised DeepLabv3+ (ReCo's); see README."""

    init: InitKind = knob("pretrained")
    compare_random: bool = knob(True, resume_safe=True)
    dataset: Literal["auto", "scenes", "cocostuff", "voc", "cityscapes", "ade20k"] = knob(
        "auto", "auto | scenes | cocostuff | voc | cityscapes | ade20k")
    data_root: str = knob("", "empty: the scenes shards; else a dataset folder detected by its layout")
    method: Literal[SEGMENT_METHODS] = knob(
        "supervised", "supervised (fine-tune on the labelled images) | classmix (+ mean teacher on the unlabelled "
                      "ones, ClassMix/CutMix) | reco (classmix + ReCo's regional contrast, arXiv 2104.04465)")
    labeled: int | float = knob(1.0, "train images that keep their labels: an integer = a count (8), a number with a "
                                     "decimal point = a fraction (0.05); 1.0 = all; the rest of the train split is "
                                     "used without labels")
    split_seed: int = knob(0, "which images keep their labels (a uniform draw: the labels are never read; written to "
                              "models/segment/labeled.txt)", ge=0, le=SEED_MAX)
    head: Literal["auto", "fcn", "deeplabv3plus"] = knob(
        "auto", "auto (fcn for supervised, SlotCon's protocol; deeplabv3plus otherwise, ReCo's) | fcn | deeplabv3plus; "
                "the supervised baseline of a semi-supervised run always gets the run's head")
    compare_supervised: bool = knob(True, "semi-supervised methods also train supervised on the same labels (the "
                                          "gain, the picture)")
    output_stride: Literal[8, 16] = knob(16, "8 as mmseg's fcn_r50-d8; ReCo's DeepLabv3+: 16")
    iters: int = knob(60, "mmseg VOC: 20000/40000 at batch 16; ReCo: 40000", ge=1, le=MAX_STEPS)
    batch_size: int = knob(8, "labelled images per step (global); mmseg: 16; ReCo: 10 (+ 10 unlabelled)",
                           ge=1, le=MAX_BATCH)
    lr: float = knob(0.01, "mmseg: 0.01, poly power 0.9; ReCo: 2.5e-3", gt=0)
    power: float = knob(0.9, gt=0)
    momentum: float = knob(0.9, ge=0, lt=1)
    nesterov: bool = knob(False, "ReCo: true")
    weight_decay: float = knob(5e-4, ge=0)
    crop_size: int = knob(96, "mmseg VOC: 512; ReCo VOC: 321", ge=32, le=MAX_PIXELS)
    scale_range: list[float] = knob([0.5, 2.0], "random rescale ratio; mmseg: [0.5, 2.0]; ReCo VOC: [0.5, 1.5]")
    head_channels: int = knob(128, "FCN head width (mmseg R50: 512); DeepLabv3+'s ASPP and decoder width (ReCo: 256)",
                              ge=8)
    num_convs: int = knob(2, "3x3 conv-BN-ReLU in the head; mmseg: 2", ge=0)
    concat_input: bool = knob(True, "concat the trunk output back before the classifier; mmseg FCN: true")
    aux_weight: float = knob(0.4, "auxiliary FCN head on layer3; mmseg: 0.4 (0 = no aux head)", ge=0)
    test_mode: Literal["whole", "slide"] = knob("whole", "whole | slide (crop_size windows, 2/3 overlap; mmseg "
                                                         "Cityscapes)")
    num_workers: int = knob(0, ge=0, resume_safe=True, le=MAX_WORKERS)
    nproc_per_node: int = knob(1, ">1: the stage launches torch.distributed.run itself (DDP, SyncBN on GPUs)", ge=1,
                               resume_safe=True, le=MAX_WORKERS)
    seed: int = knob(0, ge=0, le=SEED_MAX)
    amp: bool = knob(True, "bf16 autocast on CUDA (fp32 on CPU)")
    save_every: int = knob(20, "resumable checkpoint cadence (iterations), with --checkpoints", ge=1, resume_safe=True)
    num_vis: int = knob(4, "val images in plots/segment/predictions.png (image | truth | each model)", ge=0,
                        resume_safe=True)
    max_lost_fraction: float = _lost_knob()
    semisup: SemiSupParams = Field(default_factory=SemiSupParams)
    reco: ReCoParams = Field(default_factory=ReCoParams)

    @model_validator(mode="after")
    def _check(self) -> "SegmentConfig":
        _check_init(self.init)
        _check_divisible(self.batch_size, self.nproc_per_node)
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
    """``probe``: frozen-trunk linear probes (stage probe): dense (semantic maps) and object (GT-box
    classification)."""

    init: InitKind = knob("pretrained", _INIT_DOC)
    arch: Literal[RESNET_ARCHS] = knob("resnet18", "only for init: random (otherwise the backbone file names it)")
    compare_random: bool = knob(True, "also probe a randomly initialised trunk (seed), so the gain is visible")
    layers: list[Literal["layer2", "layer3", "layer4"]] = knob(
        ["layer3", "layer4"], "frozen trunk stages, concatenated on the finest grid", min_length=1)
    resolution: int = knob(256, "short side resize + centre crop (as unsup: 2x the 128 px scenes)",
                           ge=32, le=MAX_PIXELS)
    label_size: int = knob(64, "the dense probe trains on logits upsampled to this size", ge=8, le=MAX_PIXELS)
    steps: int = knob(300, "AdamW steps per linear classifier (cosine decay)", ge=1, le=MAX_STEPS)
    lr: float = knob(0.01, gt=0)
    weight_decay: float = knob(1e-4, ge=0)
    probe_batch: int = knob(64, "images per dense-probe step", ge=1, le=MAX_BATCH)
    batch_size: int = knob(16, "images per feature-extraction batch", ge=1, le=MAX_BATCH)
    seed: int = knob(0, "classifier init and sampling (and the random trunk's init)", ge=0, le=SEED_MAX)
    max_lost_fraction: float = _lost_knob()

    @model_validator(mode="after")
    def _check(self) -> "ProbeConfig":
        _check_init(self.init)
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers={self.layers} lists a layer twice")
        return self


class UnsupConfig(Section):
    """``unsup``: prototypes -> Hungarian-matched mIoU (PiCIE protocol on COCO-Stuff-27)."""

    dataset: Literal["auto", "scenes", "cocostuff27", "cocostuff", "voc", "cityscapes", "ade20k"] = knob(
        "auto", "auto | scenes | cocostuff27 | cocostuff | voc | cityscapes | ade20k")
    data_root: str = knob("", "empty: the scenes shards' val split; a COCO-Stuff root (+ curated/) -> COCO-Stuff-27 "
                              "(PiCIE protocol)")
    resolution: int = knob(256, "short side resize + centre crop; PiCIE on COCO-Stuff-27: 320. The demo upsamples its "
                                "128 px scenes 2x so the stride-32 teacher sees an 8x8 grid and objects near their "
                                "pretraining scale (64 px crops of 128 px images)", ge=32, le=MAX_PIXELS)
    compare_random: bool = knob(True, "baseline: the same method's model randomly initialised, through the same path")
    seed: int = knob(0, "init seed of that baseline and of k-means", ge=0, le=SEED_MAX)
    batch_size: int = knob(16, ge=1, le=MAX_BATCH)
    assign: Literal["auto", "kmeans"] = knob(
        "auto", "auto: the method's prototypes if it has them (SlotCon), else k-means with K = classes on its dense "
                "features (MoCo, SIM) | kmeans: k-means for every method (compares the features, not the prototypes)")
    max_lost_fraction: float = _lost_knob()


class VizConfig(Section):
    num_images: int = knob(6, "val images beside their cluster maps (prototypes; k-means for methods without them)",
                           ge=1)
    top_prototypes: int = knob(6, "most used prototypes (clusters) in the concept figure", ge=1)
    num_neighbors: int = knob(5, "nearest segments per prototype; paper's concept figure: 5", ge=1)
    resolution: int = knob(256, "short side resize + centre crop of the val images (as unsup)", ge=32, le=MAX_PIXELS)
    batch_size: int = knob(16, ge=1, le=MAX_BATCH)
    num_clusters: int = knob(0, "k-means K for methods without prototypes (MoCo); 0 = the shards' semantic classes",
                             ge=0)
    seed: int = knob(0, "k-means seed", ge=0, le=SEED_MAX)
    max_lost_fraction: float = _lost_knob()
