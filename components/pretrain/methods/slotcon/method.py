"""SlotCon as a pretraining method of the engine: model, optimiser, one step, the teacher's EMA."""
from __future__ import annotations

from typing import Any

import torch

from components import dist
from components.engine.optim import build_optimizer
from components.pretrain.method import PretrainMethod
from components.pretrain.methods.slotcon.model import SlotCon, model_kwargs_from_config


class SlotConMethod(PretrainMethod):
    """Per step (paper Sec. 3 / the official recipe): :class:`components.pretrain.methods.slotcon.model.SlotCon` computes
    ``λ·L_group + (1 − λ)·L_slot`` on the two views, with the contrastive negatives gathered and the center
    all-reduced over ranks (:mod:`components.dist`); DDP averages the gradients (SyncBatchNorm on CUDA as the official
    recipe); LARS steps with the scheduled lr; then the teacher (encoder + prototypes) follows the student by EMA with
    the scheduled momentum, vectorised with ``torch._foreach_*``.
    """

    name = "slotcon"
    stat_keys = ("loss", "loss_group", "loss_slot", "num_slots", "assign_entropy")
    plot_keys = ("loss", "loss_group", "loss_slot")
    backbone_prefix = "teacher_encoder.backbone."  # SlotCon transfers the teacher (official convert scripts)
    model_class = SlotCon  # EMA pairs: SlotCon.ema_parameters (encoder + prototypes)

    def model_kwargs(self) -> dict[str, Any]:
        return model_kwargs_from_config(self.params)

    @staticmethod
    def dense_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.teacher_features(images)

    @staticmethod
    def prototype_scores(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor | None:
        return model.teacher_scores(images)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(model, name=self.params.optimizer, lr=self.peak_lr,
                               weight_decay=self.params.weight_decay)

    def forward(self, model: torch.nn.Module, views: dict, step: int) -> dict[str, torch.Tensor]:
        world = self.plan.world_size
        views = {k: views[k] for k in ("view1", "view2", "coords1", "coords2", "flip1", "flip2")}
        return model(**views, gather=dist.gather_cat if world > 1 else None,
                     all_reduce=dist.all_reduce_mean if world > 1 else None, pad_to=self.plan.rank_batch)

    def compile(self, model: torch.nn.Module) -> None:
        model.student_encoder.compile()
        model.teacher_encoder.compile()
