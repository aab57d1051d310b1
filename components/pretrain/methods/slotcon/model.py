"""SlotCon (Wen et al., NeurIPS 2022): student/teacher encoders, semantic grouping and the two losses."""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn

from components.pretrain.methods.slotcon.align import align_scores
from components.pretrain.methods.slotcon.grouping import mean_assignment_entropy, pool_slots, prototype_scores, slot_keep_mask
from components.pretrain.methods.slotcon.heads import ConvProjector, MLPPredictor, ResNetTrunk
from components.pretrain.methods.slotcon.losses import group_loss, slot_contrastive_loss, update_center

__all__ = ["Encoder", "SlotCon", "MODEL_KWARGS", "model_kwargs_from_config"]

Collective = Callable[[torch.Tensor], torch.Tensor]

# PretrainConfig fields that are SlotCon constructor arguments (the same names)
MODEL_KWARGS = (
    "arch", "num_prototypes", "dim_hidden", "dim_out", "teacher_temp", "student_temp", "center_momentum",
    "slot_temp", "group_loss_weight",
)


def model_kwargs_from_config(cfg: Any) -> dict[str, Any]:
    """``SlotCon(**model_kwargs_from_config(cfg))`` for ``pretrain`` or its ``pretrain.slotcon`` subsection; also what
    checkpoints store as ``model_kwargs``."""
    params = getattr(cfg, "slotcon", cfg)
    return {name: getattr(params, name) for name in MODEL_KWARGS}


class Encoder(nn.Module):
    """ResNet trunk + 1×1-conv projector: (B, 3, H, W) → (B, D, H/32, W/32)."""

    def __init__(self, arch: str, dim_hidden: int, dim_out: int):
        super().__init__()
        self.backbone = ResNetTrunk(arch)
        self.projector = ConvProjector(self.backbone.num_channels, dim_hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class SlotCon(nn.Module):
    """Self-supervised semantic grouping + slot contrast.

    Attributes:
        student_encoder, teacher_encoder: :class:`Encoder` (``.backbone`` has torchvision ResNet keys minus fc).
        student_prototypes, teacher_prototypes: (K, D) parameters (the teacher's has ``requires_grad=False``).
        predictor: vector MLP applied to the student slots.
        center: (1, K) buffer, EMA of the teacher's mean score (updated inside ``forward``).

    ``forward`` takes the batch of two views made by :class:`components.pretrain.augment.TwoViewAugment` and returns
    the loss and what the trainer logs. The teacher (encoder + projector + prototypes) is an EMA of the student; the
    trainer updates it with the parameter lists of :meth:`SlotCon.ema_parameters` (vectorised, momentum from a pure
    schedule) — the model holds no schedule and reads no argv. Collectives are parameters (``gather``,
    ``all_reduce``), so the same forward runs on one CPU and under DDP.
    """

    def __init__(
        self,
        *,
        arch: str = "resnet50",
        num_prototypes: int = 256,
        dim_hidden: int = 4096,
        dim_out: int = 256,
        teacher_temp: float = 0.07,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        slot_temp: float = 0.2,
        group_loss_weight: float = 0.5,
    ):
        super().__init__()
        self.arch = arch
        self.num_prototypes = num_prototypes
        self.dim_out = dim_out
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.slot_temp = slot_temp
        self.group_loss_weight = group_loss_weight

        self.student_encoder = Encoder(arch, dim_hidden, dim_out)
        self.teacher_encoder = copy.deepcopy(self.student_encoder)
        # N(0, 1) as the official nn.Embedding; only their direction matters (cosine scores)
        self.student_prototypes = nn.Parameter(torch.randn(num_prototypes, dim_out))
        self.teacher_prototypes = nn.Parameter(self.student_prototypes.detach().clone(), requires_grad=False)
        for p in self.teacher_encoder.parameters():
            p.requires_grad_(False)
        self.predictor = MLPPredictor(dim_out, dim_hidden, dim_out)
        self.register_buffer("center", torch.zeros(1, num_prototypes))

    # ---------------------------------------------------------------------------------------------------------------
    def ema_parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Matching lists (teacher, student) for the trainer's foreach EMA: encoder (backbone + projector) and
        prototypes. BN running statistics are not EMA'd: the teacher keeps its own (as the official code)."""
        teacher = list(self.teacher_encoder.parameters()) + [self.teacher_prototypes]
        student = list(self.student_encoder.parameters()) + [self.student_prototypes]
        return teacher, student

    def _student(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.student_encoder(x)
        scores = prototype_scores(z, self.student_prototypes)
        return z, scores, pool_slots(z, scores, self.teacher_temp)

    @torch.no_grad()
    def _teacher(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.teacher_encoder(x)
        scores = prototype_scores(y, self.teacher_prototypes)
        return scores, pool_slots(y, scores, self.teacher_temp)

    def forward(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor,
        coords1: torch.Tensor,
        coords2: torch.Tensor,
        flip1: torch.Tensor,
        flip2: torch.Tensor,
        *,
        gather: Collective | None = None,
        all_reduce: Collective | None = None,
        pad_to: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """One SlotCon step on a batch of view pairs (updates ``center`` as a side effect in training mode).

        Args:
            view1, view2: (B, 3, S, S) normalised views (channels_last is fine).
            coords1, coords2: (B, 4) overlap box in each view's normalised coordinates (flipped with the view).
            flip1, flip2: (B,) bool horizontal flips.
            gather: concatenation over ranks for the contrastive negatives (``components.dist.gather_cat``).
            all_reduce: mean over ranks for the center and the entropy metric (``components.dist.all_reduce_mean``).
            pad_to: the configured per-rank batch: the slot gather pads to it (no size exchange when a rank's batch
                lost an image at decode).
        Returns:
            loss: () total ``λ·L_group + (1 − λ)·L_slot`` (with graph).
            loss_group, loss_slot: () detached parts, each summed over the two directions.
            num_slots: () detached, kept query slots per image, averaged over the two directions.
            assign_entropy: () detached entropy (nats) of the teacher's mean prototype assignment (≤ log K).
        """
        _, s1, q1 = self._student(view1)
        _, s2, q2 = self._student(view2)
        with torch.no_grad():
            t1, k1 = self._teacher(view1)
            t2, k2 = self._teacher(view2)
            t1_aligned = align_scores(t1, coords1, flip1)
            t2_aligned = align_scores(t2, coords2, flip2)
        s1_aligned = align_scores(s1, coords1, flip1)
        s2_aligned = align_scores(s2, coords2, flip2)

        # group loss uses the center of the previous step, then the center moves (official order)
        loss_group = group_loss(s1_aligned, t2_aligned, self.center, self.student_temp, self.teacher_temp) + group_loss(
            s2_aligned, t1_aligned, self.center, self.student_temp, self.teacher_temp
        )
        if self.training:
            with torch.no_grad():
                self.center.copy_(update_center(self.center, (t1, t2), self.center_momentum, all_reduce))

        kw = dict(temperature=self.slot_temp, predictor=self.predictor, gather=gather, pad_to=pad_to)
        loss_slot = slot_contrastive_loss(q1, k2, s1, t2, **kw) + slot_contrastive_loss(q2, k1, s2, t1, **kw)

        loss = self.group_loss_weight * loss_group + (1.0 - self.group_loss_weight) * loss_slot
        with torch.no_grad():
            kept = (slot_keep_mask(s1) & slot_keep_mask(t2)).sum() + (slot_keep_mask(s2) & slot_keep_mask(t1)).sum()
            num_slots = kept.float() / (2 * view1.shape[0])
            entropy = mean_assignment_entropy(torch.cat([t1, t2]), self.teacher_temp, all_reduce)
        return {
            "loss": loss,
            "loss_group": loss_group.detach(),
            "loss_slot": loss_slot.detach(),
            "num_slots": num_slots,
            "assign_entropy": entropy,
        }

    # ---------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher projections: (B, 3, H, W) → (B, D, H/32, W/32)."""
        return self.teacher_encoder(x)

    @torch.no_grad()
    def teacher_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher cosine scores against its normalised prototypes: (B, 3, H, W) → (B, K, H/32, W/32) in [-1, 1]."""
        return prototype_scores(self.teacher_encoder(x), self.teacher_prototypes)
