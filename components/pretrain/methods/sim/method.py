"""SIM as a pretraining method of the engine: loader with block masks, model, AdamW, one step, clipping, the EMA."""
from __future__ import annotations

from typing import Any

import torch

from components import dist
from components.constants import VIT_SPECS
from components.pretrain.method import PretrainMethod
from components.pretrain.methods.sim.masking import DrawCropsAndMask, num_masked_patches
from components.pretrain.methods.sim.model import SIM, model_kwargs_from_config
from components.pretrain.views import batch_views

def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: decayed (matrices, class and mask tokens) and not (1-D tensors and
    biases). The released code's rule: timm's weight-decay groups with an empty skip list, so the tokens are decayed;
    the frozen positions (and a frozen patch projection) are in no group."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


class SimMethod(PretrainMethod):
    """Per step (the released ViT-B recipe): the loader workers draw the two crop boxes, flips and view A's block mask
    (:class:`components.pretrain.methods.sim.masking.DrawCropsAndMask`); the shared device-side augmentation makes the
    two views (view 1 = A: blur always; view 2 = B: blur p 0.1, solarize p 0.2, as the authors' two colour pipelines);
    :class:`components.pretrain.methods.sim.model.SIM` computes UniGrad with the correlation matrix all-reduced over
    ranks; DDP averages the gradients; the global gradient norm is clipped to ``clip_grad``; AdamW (betas 0.9 /
    ``beta2``, weight decay on matrices and the class / mask tokens, none on norms and biases, as released) steps with
    the scheduled lr (warm-up from 0, as the released ``lr_sched``); then the target (encoder, ``decoder_embed``,
    projector) follows by EMA with the cosine momentum from ``teacher_momentum``.

    The crops come from the shared two-view sampler (:func:`components.pretrain.crops.sample_two_crops`) with
    ``crop_min_overlap = 0``: the two crops are drawn independently, as the authors do (SlotCon re-draws view B until
    it overlaps view A by >= 1 % of its area); a mask token of a B patch outside A's frame gets a position outside [0,
    1].
    """

    name = "sim"
    stat_keys = ("loss", "loss_dense", "loss_global", "loss_pos", "loss_neg", "target_std", "target_erank")
    plot_keys = ("loss", "loss_dense", "loss_global")
    backbone_prefix = "student_encoder."  # SIM transfers the online encoder (the released fine-tuning loads it)
    crop_min_overlap = 0.0  # the authors draw the two crops independently (see the class docstring)
    warmup_start_factor = 0.0  # released util/lr_sched.py: lr = peak * step / warmup_steps during the warm-up
    model_class = SIM  # EMA pairs: SIM.ema_parameters (encoder, decoder_embed, projector; trainable ones only)

    def __init__(self, cfg, plan, device: torch.device):
        super().__init__(cfg, plan, device)
        n = cfg.image_size // VIT_SPECS[self.params.arch]["patch_size"]
        self.grid = (n, n)
        self.num_masked = num_masked_patches(self.grid, self.params.mask_ratio)

    def model_kwargs(self) -> dict[str, Any]:
        return model_kwargs_from_config(self.params, self.cfg.image_size)

    @staticmethod
    def dense_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.student_features(images)

    # prototype_scores: None (the base class): SIM has no prototypes; downstream clusters dense_features

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(model, self.params.weight_decay), lr=self.peak_lr,
                                 betas=(0.9, self.params.beta2))

    def crop_drawer(self, epoch: int):
        """The shared two-view loader's draw plus view A's block mask (drawn in the loader workers)."""
        return DrawCropsAndMask(self.cfg.seed, epoch, self.plan.rank, self.crop_scale, grid=self.grid,
                                num_masked=self.num_masked, min_overlap=self.crop_min_overlap)

    def prepare(self, batch: dict, device: torch.device) -> dict:
        """The shared two views plus ``mask`` ``(B', L)``: an image no decoder accepted is dropped with its crops by
        :func:`~components.pretrain.views.make_views`, and here with its mask (by its url and key), so rows stay
        aligned."""
        views = batch_views(batch, self.augment, device)
        dropped = views.pop("dropped", ())
        self.lost.add_dropped((url, key) for url, key, _ in dropped)
        mask = batch["mask"]
        if dropped:
            bad = {(url, key) for url, key, _ in dropped}
            mask = mask[[i for i, pair in enumerate(zip(batch["urls"], batch["keys"])) if pair not in bad]]
        views["mask"] = mask.to(device, non_blocking=True)
        return views

    def forward(self, model: torch.nn.Module, views: dict, step: int) -> dict[str, torch.Tensor]:
        views = {k: views[k] for k in ("view1", "view2", "mask", "boxes", "flip1", "flip2")}
        return model(**views, all_reduce=dist.all_reduce_mean if self.plan.world_size > 1 else None)

    def before_update(self, model: torch.nn.Module, step: int) -> None:
        if self.params.clip_grad > 0:  # after DDP's all-reduce: every rank clips the same global norm
            torch.nn.utils.clip_grad_norm_(self._trainable(model), self.params.clip_grad, foreach=True)

    def _trainable(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return self.per_model(model, "trainable", lambda m: [p for p in m.parameters() if p.requires_grad])

    def compile(self, model: torch.nn.Module) -> None:
        # the encoders run through vit_tokens (gather of visible tokens, resized positions): compile their blocks
        for blocks in (model.student_encoder.encoder.layers, model.teacher_encoder.encoder.layers, model.projector,
                       model.teacher_projector, model.predictor):
            blocks.compile()
