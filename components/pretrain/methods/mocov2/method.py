"""MoCo v2 as a pretraining method of the engine: model, optimiser, one step, the key encoder's momentum update."""
from __future__ import annotations

from typing import Any

import torch

from components import dist
from components.config.pretrain import mocov2_batch_problem
from components.engine.optim import build_optimizer
from components.errors import UserError
from components.pretrain.augment import TwoViewAugment
from components.pretrain.method import PretrainMethod
from components.pretrain.methods.mocov2.losses import shuffle_plan
from components.pretrain.methods.mocov2.model import MoCoV2, model_kwargs_from_params
from components.pretrain.views import sample_seed

# MoCo v2's augmentation where it differs from TwoViewAugment's defaults (SlotCon/BYOL's asymmetric recipe)
MOCOV2_AUGMENT = dict(jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, grayscale_prob=0.2, blur_prob=(0.5, 0.5),
                      solarize_prob=(0.0, 0.0), interpolation="bilinear")


class MocoV2Method(PretrainMethod):
    """Per step: :class:`components.pretrain.methods.mocov2.model.MoCoV2` encodes view 1 with the query encoder and view
    2 with the key encoder on shuffled BatchNorm groups of the global batch (the permutation is drawn from ``(seed,
    step)``: the same on every rank without a broadcast, and the same after a resume), computes InfoNCE against the
    queue and enqueues the gathered keys; DDP averages the gradients; SGD steps with ``lr = base_lr · batch / 256``
    (warm-up, then cosine); then the key encoder follows the query encoder with the constant momentum ``key_momentum``
    (vectorised EMA).

    Views (MoCo v2's "aug+", Chen et al. 2020, Sec. 3): random resized crops with scale (0.2, 1), colour jitter (0.4,
    0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, Gaussian blur σ ∈ [0.1, 2] with p 0.5 on both views, flips; no
    solarisation. The two crops are drawn **independently** (``min_overlap = 0``), not with the shared sampler's
    forced overlap: MoCo's positive is the *image*, no pixel correspondence is used, and forcing an overlap would hand
    the baseline SlotCon's prior of easier, more similar pairs (at scale (0.2, 1) the 1 % rule rejects only a few per
    cent of pairs; the point is that the baseline is MoCo's, not a variant of it).
    """

    name = "mocov2"
    stat_keys = ("loss", "acc", "pos_sim", "neg_sim")
    plot_keys = ("loss",)
    backbone_prefix = "query_encoder.backbone."  # MoCo transfers the query encoder (the official convert script)
    crop_scale = (0.2, 1.0)
    crop_min_overlap = 0.0  # independent crops (see the class docstring)
    model_class = MoCoV2
    # per-process BatchNorm under DDP, as the released code (plain DDP, no SyncBatchNorm): shuffle BN only hides a
    # query's statistics from its key while each process normalises its own slice; SyncBatchNorm would normalise both
    # encoders with the whole global batch and reopen the leak that shuffle BN exists to close
    sync_bn = False

    def __init__(self, cfg, plan, device: torch.device):
        super().__init__(cfg, plan, device)
        p = self.params
        problem = mocov2_batch_problem(p, plan.global_batch, plan.rank_batch)  # what `slotcon check` also checks
        if problem:
            raise UserError(f"params: pretrain.{problem}")
        if p.queue_size > plan.samples_per_epoch:
            raise UserError(f"params: pretrain.mocov2.queue_size={p.queue_size} exceeds the {plan.samples_per_epoch} "
                            "samples per epoch: images would meet their own older keys as negatives; lower it")
        self.augment = TwoViewAugment(image_size=cfg.image_size, **MOCOV2_AUGMENT).to(device)

    # -- the model ----------------------------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        return model_kwargs_from_params(self.params)

    def ema_pairs(self, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return model.momentum_parameters()  # the key encoder follows the query encoder

    @staticmethod
    def dense_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.query_features(images)

    # prototype_scores: None (the base class): MoCo has no prototypes; downstream clusters dense_features

    # -- engine hooks ---------------------------------------------------------------------------------------------------
    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        # released code: SGD(model.parameters(), weight_decay=1e-4): every parameter decayed, BN and biases included
        return build_optimizer(model, name=self.params.optimizer, lr=self.peak_lr,
                               weight_decay=self.params.weight_decay, decay_1d=True)

    def momentum_at(self, step: int) -> float | None:
        return self.params.key_momentum  # constant, as MoCo (no cosine schedule)

    def shuffle(self, step: int) -> torch.Tensor:
        """The key encoder's global sample order at ``step``: the same on every rank and after a resume."""
        gen = torch.Generator().manual_seed(sample_seed("mocov2-shuffle-bn", self.cfg.seed, step))
        perm, _ = shuffle_plan(self.plan.global_batch, self.plan.world_size * self.params.bn_splits, gen)
        return perm

    def forward(self, model: torch.nn.Module, views: dict, step: int) -> dict[str, torch.Tensor]:
        world = self.plan.world_size
        return model(views["view1"], views["view2"], perm=self.shuffle(step),
                     gather=dist.gather_cat if world > 1 else None, rank=self.plan.rank, world=world)

    def compile(self, model: torch.nn.Module) -> None:
        model.query_encoder.compile()
        model.key_encoder.compile()
