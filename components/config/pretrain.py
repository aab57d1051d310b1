"""The ``pretrain`` section (what every method shares, one subsection per method: SlotCon, SIM, MoCo v2) and the
``export`` section of ``params.yaml``."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from components.config.schema import MAX_BATCH, MAX_EPOCHS, MAX_PIXELS, MAX_QUEUE, MAX_WORKERS, SEED_MAX, Section, knob
from components.constants import RESNET_ARCHS, VIT_ARCHS, VIT_SPECS


class SlotConParams(Section):
    """``pretrain.slotcon``: SlotCon (Wen et al. 2022), the model and its optimiser; paper values in comments."""

    arch: Literal[RESNET_ARCHS] = knob("resnet18", "paper: resnet50")
    optimizer: Literal["lars", "sgd", "adamw"] = knob("lars", "paper: LARS, eta = 0.001, no wd / trust ratio on 1-D "
                                                              "params")
    base_lr: float = knob(1.0, "lr = base_lr * batch_size / 256 (the global batch); paper: 1.0 with LARS", gt=0)
    min_lr: float = knob(1e-6, "cosine floor", ge=0)
    warmup_epochs: int = knob(1, "linear warm-up per iteration from lr/100; paper and released scripts: 5", ge=0)
    weight_decay: float = knob(1e-5, "paper: 1e-5; released code: none on 1-D tensors (biases, BN)", ge=0)
    num_prototypes: int = knob(32, "K; paper: 256 (COCO), 2048 (ImageNet)", ge=2)
    dim_hidden: int = knob(256, "projector/predictor hidden size; paper: 4096", ge=8)
    dim_out: int = knob(64, "D; paper: 256", ge=8)
    teacher_momentum: float = knob(0.99, "m0 of the cosine EMA schedule to 1; paper: 0.99", ge=0, le=1)
    teacher_temp: float = knob(0.07, "tau_t; paper: 0.07", gt=0)
    student_temp: float = knob(0.1, "tau_s; paper: 0.1", gt=0)
    center_momentum: float = knob(0.9, "paper: 0.9", ge=0, lt=1)
    slot_temp: float = knob(0.2, "InfoNCE tau; paper: 0.2", gt=0)
    group_loss_weight: float = knob(0.5, "lambda; paper: 0.5", ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> "SlotConParams":
        _check_min_lr(self.min_lr, self.base_lr)
        return self


class SimParams(Section):
    """``pretrain.sim``: SIM, Siamese Image Modeling (Tao et al. 2023), on a plain ViT, and its optimiser. Defaults:
    the CPU demo; paper values = the released ViT-B/16 recipe (configs/pretrain/dist_sim_base_1600ep.sh)."""

    arch: Literal[VIT_ARCHS] = knob("vit_demo_16", "4 blocks x 192-d, patch 16 (6x6 tokens at 96 px); paper: vit_b_16 "
                                                   "(also: vit_s_16)")
    optimizer: Literal["adamw"] = knob("adamw", "paper: AdamW, betas (0.9, beta2)")
    base_lr: float = knob(1.5e-3, "lr = base_lr * batch_size / 256 (demo: 1.9e-4); paper: 6.25e-5 at batch 4096 (lr "
                                  "1e-3)", gt=0)
    min_lr: float = knob(1e-6, "cosine floor; paper: 0", ge=0)
    warmup_epochs: int = knob(1, "linear warm-up per iteration from 0 (released code: util/lr_sched.py); paper: 40, "
                                 "of 1600 epochs", ge=0, le=MAX_EPOCHS)
    weight_decay: float = knob(0.05, "paper: 0.05; released code: none on 1-D tensors and biases, class/mask tokens "
                                     "decayed", ge=0)
    beta2: float = knob(0.95, "AdamW beta2; paper: 0.95", gt=0, lt=1)
    clip_grad: float = knob(1.0, "global gradient-norm clip, 0 = off; paper: 1.0", ge=0)
    teacher_momentum: float = knob(0.995, "m0 of the cosine EMA schedule to 1; paper: 0.995", ge=0, le=1)
    mask_ratio: float = knob(0.6, "block-masked share of view A (BEiT blocks, fixed count); paper: 118/196 = 0.602",
                             gt=0, lt=1)
    decoder_dim: int = knob(192, "decoder_embed / projector / predictor width; paper: 768", ge=8)
    decoder_heads: int = knob(6, "paper: 16", ge=1)
    projector_depth: int = knob(1, "transformer blocks on both branches; paper: 2", ge=0)
    predictor_depth: int = knob(2, "transformer blocks, online branch only; paper: 4", ge=1)
    norm: Literal["bn", "ln"] = knob("bn", "bn | ln in projector/predictor blocks; paper: bn (its ablation prefers "
                                           "BN)")
    neg_weight: float = knob(0.02, "UniGrad lambda; paper: 0.02", ge=0)
    global_weight: float = knob(1.0, "alpha1 (UniGrad on each image's mean token); paper: 1 for short schedules; "
                                     "released code: 0", ge=0)
    dense_weight: float = knob(4.0, "alpha2 (UniGrad on tokens minus their image mean; raw tokens if alpha1 = 0); "
                                    "paper: 4 for short schedules; released code: 1", gt=0)
    online_ln: bool = knob(False, "LayerNorm the predictions too (the targets always are); released code: false")
    train_patch_embed: bool = knob(False, "released code: the patch projection stays at its random init (MoCo v3's "
                                          "trick)")

    @model_validator(mode="after")
    def _check(self) -> "SimParams":
        _check_min_lr(self.min_lr, self.base_lr)
        if self.decoder_dim % 4 or self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim={self.decoder_dim} must be a multiple of 4 (2-D sin-cos positions) and "
                             f"of decoder_heads={self.decoder_heads}")
        return self


class MocoV2Params(Section):
    """``pretrain.mocov2``: MoCo v2 (Chen et al. 2020), the image-level baseline; transfers the query encoder (paper
    values in comments)."""

    arch: Literal[RESNET_ARCHS] = knob("resnet18", "paper: resnet50")
    optimizer: Literal["sgd", "lars", "adamw"] = knob("sgd", "paper: SGD, momentum 0.9")
    base_lr: float = knob(0.24, "lr = base_lr * batch_size / 256 (0.03 at batch 32), cosine to min_lr; paper: 0.03",
                          gt=0)
    min_lr: float = knob(0.0, "cosine floor; paper: 0", ge=0)
    warmup_epochs: int = knob(0, "paper and released code: 0; cosine from the first step", ge=0,
                              le=MAX_EPOCHS)
    weight_decay: float = knob(1e-4, "paper: 1e-4; released code: on every parameter, BN and biases included", ge=0)
    dim_hidden: int = knob(512, "hidden width of the 2-layer MLP head (Linear-ReLU-Linear); paper: 2048 (= the R50 "
                                "trunk's channels)", ge=8)
    dim: int = knob(128, "embedding size; paper: 128", ge=8)
    queue_size: int = knob(128, "negatives: a multiple of batch_size, fewer than the images per epoch (else an image "
                                "meets its own older keys as negatives); paper: 65536", ge=2, le=MAX_QUEUE)
    temperature: float = knob(0.2, "InfoNCE tau; paper: 0.2", gt=0)
    key_momentum: float = knob(0.99, "constant momentum of the key encoder; paper: 0.999 (a 1000-step time constant: "
                                     "too slow for a demo of tens of steps)", ge=0, le=1)
    bn_splits: int = knob(2, "BatchNorm groups per process; keys on shuffled groups (shuffle BN needs >= 2 groups in "
                             "all); paper: 1 per GPU over 8 GPUs", ge=1)

    @model_validator(mode="after")
    def _check(self) -> "MocoV2Params":
        _check_min_lr(self.min_lr, self.base_lr)
        return self


def mocov2_batch_problem(p: MocoV2Params, global_batch: int, rank_batch: int) -> str | None:
    """What is wrong with MoCo v2's queue and BatchNorm groups for this batch (None: nothing), as
    ``mocov2.<key>=<value> ...``: the one rule both ``slotcon check`` (:class:`PretrainConfig`'s validator, with the
    configured world size) and the pretrain stage (with the world it runs in) apply."""
    if p.queue_size % global_batch:
        return (f"mocov2.queue_size={p.queue_size} must be a multiple of batch_size={global_batch} (a batch of keys "
                "never wraps the queue)")
    if rank_batch % p.bn_splits:
        return (f"mocov2.bn_splits={p.bn_splits} must divide the per-process batch {rank_batch} (batch_size / world "
                "size)")
    return None


def _check_min_lr(min_lr: float, base_lr: float) -> None:
    if min_lr > base_lr:
        raise ValueError(f"min_lr={min_lr} must be <= base_lr={base_lr}")


class PretrainConfig(Section):
    """``pretrain``: what every method shares (data, schedule length, processes, speed knobs) plus one subsection per
    method; ``method`` picks which subsection is used (the others are validated but change nothing)."""

    method: Literal["slotcon", "sim", "mocov2"] = knob(
        "slotcon", "slotcon (semantic grouping, ResNet) | sim (Siamese Image Modeling, ViT) | mocov2 (image-level "
                   "baseline); each has its subsection below")
    image_size: int = knob(96, "paper: 224; small demo crops for CPU speed: 96 px gives a 3x3 teacher map (~1.8 kept "
                               "slots per image), 64 px only ~0.7", ge=32, le=MAX_PIXELS)
    batch_size: int = knob(32, "global batch over all ranks; paper: 512 on COCO", ge=2, le=MAX_BATCH)
    epochs: int = knob(3, "paper: 800 (COCO / COCO+)", ge=1, le=MAX_EPOCHS)
    seed: int = knob(0, ge=0, le=SEED_MAX)
    num_workers: int = knob(1, "loader workers per rank: read shards, draw crop boxes (+ JPEG decode on CPU); GPUs: 8",
                            ge=0, resume_safe=True, le=MAX_WORKERS)
    nproc_per_node: int = knob(1, ">1: the stage launches torch.distributed.run itself",
                               ge=1, resume_safe=True, le=MAX_WORKERS)
    nnodes: int = knob(1, ge=1, resume_safe=True, le=MAX_WORKERS)
    amp: bool = knob(True, "bf16 autocast on CUDA (fp32 on CPU)")
    channels_last: bool = knob(True)
    compile: bool = knob(False, "torch.compile the encoders (GPU)", resume_safe=True)
    save_every_steps: int = knob(50, "atomic checkpoint cadence, plus every epoch end", ge=1, resume_safe=True)
    log_every_steps: int = knob(5, "the host looks at the step figures (MLflow, non-finite check) this often", ge=1,
                                resume_safe=True)
    samples_per_epoch: int = knob(0, "0 = all images of the pretraining shards", ge=0)
    max_lost_fraction: float = knob(0.001, "stop (one line, every rank) when more than this share of the shards' "
                                           "samples is lost (damaged tar, corrupt JPEG ...; counted against "
                                           "index.json); 0 = any loss stops", ge=0.0, le=1.0)
    slotcon: SlotConParams = Field(default_factory=SlotConParams)
    sim: SimParams = Field(default_factory=SimParams)
    mocov2: MocoV2Params = Field(default_factory=MocoV2Params)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        if isinstance(data, dict) and "warmup_epochs" in data:
            raise ValueError("warmup_epochs moved into the method's subsection: set pretrain.<method>.warmup_epochs "
                             "(slotcon, sim or mocov2), each with its own paper value")
        return data

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        world = self.nproc_per_node * self.nnodes
        if self.batch_size % world:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by world size {world}")
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError(f"{self.method}.warmup_epochs={self.warmup_epochs} must be < epochs={self.epochs}")
        if self.method == "sim" and self.image_size % VIT_SPECS[self.sim.arch]["patch_size"]:
            raise ValueError(f"image_size={self.image_size} is not a multiple of {self.sim.arch}'s patch size "
                             f"{VIT_SPECS[self.sim.arch]['patch_size']} (method sim)")
        if self.method == "mocov2":
            problem = mocov2_batch_problem(self.mocov2, self.batch_size, self.batch_size // world)
            if problem:
                raise ValueError(problem)
        return self

    @property
    def method_params(self) -> Section:
        """The subsection of the chosen method."""
        return getattr(self, self.method)

    @property
    def arch(self) -> str:
        return self.method_params.arch

    @property
    def warmup_epochs(self) -> int:
        """The chosen method's warm-up (each method carries its own)."""
        return self.method_params.warmup_epochs


class ExportConfig(Section):
    register_model: bool = knob(True, "register the backbone as a new version of tracking.registered_model in MLflow")
