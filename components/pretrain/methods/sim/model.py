"""SIM, Siamese Image Modeling (Tao et al., CVPR 2023, arXiv 2206.01204): predict view B's dense tokens from a masked
view A, knowing where B's patches lie in A.

The online ViT + projector/predictor and its EMA target (:class:`SIM`).
"""
from __future__ import annotations

import copy
from functools import partial
from typing import Any, Callable

import torch
from torch import nn
from torchvision.models.vision_transformer import EncoderBlock

from components.backbone import build_vit, vit_feature_map, vit_tokens
from components.constants import VIT_SPECS
from components.pretrain.methods.sim.losses import sim_loss
from components.pretrain.methods.sim.masking import num_masked_patches
from components.pretrain.methods.sim.positions import grid_positions, relative_embedding, relative_positions, sincos_2d

__all__ = ["SIM", "TokenBatchNorm", "model_kwargs_from_config", "visible_indices"]


class TokenBatchNorm(nn.Module):
    """BatchNorm1d over ``(B, L, D)`` tokens: per-channel statistics over the batch and the tokens, computed in fp32
    (the released code's ``PermuteBN``); under DDP on CUDA the engine makes it a SyncBatchNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.bn(x.float().transpose(1, 2)).transpose(1, 2)


def _blocks(depth: int, dim: int, heads: int, norm: str) -> nn.Sequential:
    norm_layer: Callable[[int], nn.Module] = TokenBatchNorm if norm == "bn" else partial(nn.LayerNorm, eps=1e-6)
    return nn.Sequential(*[EncoderBlock(heads, dim, 4 * dim, 0.0, 0.0, norm_layer) for _ in range(depth)])


def visible_indices(mask: torch.Tensor, num_visible: int) -> torch.Tensor:
    """``(B, L)`` bool mask (True = masked, the same count per row) -> ``(B, num_visible)`` increasing indices of
    the visible patches (a stable sort puts them first; no host sync)."""
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :num_visible]


def model_kwargs_from_config(params, image_size: int) -> dict[str, Any]:
    """``pretrain.sim`` + the crop size -> :class:`SIM`'s constructor arguments (stored in ``last.pt``)."""
    keys = ("arch", "decoder_dim", "decoder_heads", "projector_depth", "predictor_depth", "norm", "mask_ratio",
            "neg_weight", "global_weight", "dense_weight", "online_ln", "train_patch_embed")
    return {"image_size": image_size, **{k: getattr(params, k) for k in keys}}


class SIM(nn.Module):
    """Online ViT + projector/predictor, EMA target ViT + projector; :meth:`forward` gives the loss of a view pair.

    Args:
        arch: a ViT of :data:`components.constants.VIT_SPECS`.
        image_size: crop side in pixels (a multiple of the patch); fixes the token grid ``n x n``.
        decoder_dim / decoder_heads: width and heads of ``decoder_embed``, projector and predictor (paper: 768 / 16).
        projector_depth / predictor_depth: blocks (released code: 2 / 4).
        norm: ``"bn"`` (paper) or ``"ln"`` in projector and predictor blocks.
        mask_ratio: share of view A's patches masked (paper: 118 / 196).
        neg_weight, global_weight, dense_weight, online_ln: the loss (:func:`components.pretrain.methods.sim.losses.sim_loss`).
        train_patch_embed: train the patch projection (released code: frozen at its random init, MoCo v3's trick
            against instability).

    Online branch (trained): the visible patches of view A (block mask,
    :mod:`components.pretrain.methods.sim.masking`) -> ViT encoder (torchvision's ``VisionTransformer``; only visible
    tokens enter) -> ``decoder_embed`` (linear to the decoder width) -> projector blocks -> [class token, visible
    tokens + A's 2-D sin-cos positions, one mask token per patch of view B + a linear map of B's relative-position
    embedding (:mod:`components.pretrain.methods.sim.positions`)] -> predictor blocks -> ``decoder_pred`` (linear) ->
    the predictions of B's L patch tokens.

    Target branch (EMA of the online encoder, ``decoder_embed`` and projector; no gradient): the full, unmasked view B
    -> its tokens minus the class token -> LayerNorm without affine parameters (in the loss) -> UniGrad
    (:mod:`components.pretrain.methods.sim.losses`).

    Projector and predictor blocks are pre-norm transformer blocks (torchvision's ``EncoderBlock``) whose norm is a
    token BatchNorm (``norm="bn"``, the paper's choice: statistics over the batch's tokens, in fp32) or LayerNorm.

    Where we differ from the released code, and why:

    - no norm between the encoder blocks and ``decoder_embed`` in either branch, as the released code; torchvision's
      final ``encoder.ln`` is kept in the module but frozen at its init (weight 1, bias 0) and unused here, so the
      exported trunk's ``encoder.ln`` is a parameter-free per-token standardisation: what the downstream stages
      (probe, unsup_seg, detect, viz through :meth:`student_features`) apply, as the released fine-tuning starts
      with a fresh norm;
    - position embeddings: torchvision's ``encoder.pos_embedding`` is set to the fixed 2-D sin-cos table and frozen,
      as the released code's ``pos_embed`` (the class position is zero).
    """

    def __init__(self, arch: str = "vit_demo_16", image_size: int = 96, *, decoder_dim: int = 192,
                 decoder_heads: int = 6, projector_depth: int = 1, predictor_depth: int = 2, norm: str = "bn",
                 mask_ratio: float = 118 / 196, neg_weight: float = 0.02, global_weight: float = 0.0,
                 dense_weight: float = 1.0, online_ln: bool = False, train_patch_embed: bool = False):
        super().__init__()
        if norm not in ("bn", "ln"):
            raise ValueError(f"norm={norm!r} must be 'bn' or 'ln'")
        patch = VIT_SPECS[arch]["patch_size"]
        self.grid = (image_size // patch, image_size // patch)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = num_masked_patches(self.grid, mask_ratio)
        self.loss_kwargs = dict(neg_weight=neg_weight, global_weight=global_weight, dense_weight=dense_weight,
                                online_ln=online_ln)

        self.student_encoder = build_vit(arch, image_size, head="none")
        with torch.no_grad():  # fixed 2-D sin-cos positions, class position 0 (MAE / SIM)
            pos = sincos_2d(grid_positions(self.grid), self.student_encoder.hidden_dim)
            self.student_encoder.encoder.pos_embedding.copy_(torch.cat([pos.new_zeros(1, pos.shape[1]), pos])[None])
        self.student_encoder.encoder.pos_embedding.requires_grad_(False)
        self.student_encoder.conv_proj.requires_grad_(train_patch_embed)
        self.student_encoder.encoder.ln.requires_grad_(False)  # not in the pretraining branches (see above)
        width = self.student_encoder.hidden_dim
        self.decoder_embed = nn.Linear(width, decoder_dim)
        self.projector = _blocks(projector_depth, decoder_dim, decoder_heads, norm)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.position_mlp = nn.Linear(2 * decoder_dim, decoder_dim)  # the released code's decoder_pos_mlp
        self.predictor = _blocks(predictor_depth, decoder_dim, decoder_heads, norm)
        self.decoder_pred = nn.Linear(decoder_dim, decoder_dim)
        dec_pos = sincos_2d(grid_positions(self.grid), decoder_dim)
        self.register_buffer("decoder_pos", torch.cat([dec_pos.new_zeros(1, decoder_dim), dec_pos]), persistent=False)
        self._init_decoder()

        self.teacher_encoder = copy.deepcopy(self.student_encoder)
        self.teacher_decoder_embed = copy.deepcopy(self.decoder_embed)
        self.teacher_projector = copy.deepcopy(self.projector)
        for module in self.teacher_modules():
            module.requires_grad_(False)

    def _init_decoder(self) -> None:
        """The released code's init: xavier-uniform linears with zero bias, mask token N(0, 0.02)."""
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.position_mlp, self.decoder_pred, *self.projector.modules(),
                  *self.predictor.modules()):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    # -- the EMA pairs --------------------------------------------------------------------------------------------
    def teacher_modules(self) -> tuple[nn.Module, ...]:
        return self.teacher_encoder, self.teacher_decoder_embed, self.teacher_projector

    def student_modules(self) -> tuple[nn.Module, ...]:
        return self.student_encoder, self.decoder_embed, self.projector

    def ema_parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(teacher, student)`` parameter lists of the EMA; frozen pairs (positions, a frozen patch projection)
        stay identical and are left out, so they never drift by rounding."""
        teacher, student = [], []
        for t_mod, s_mod in zip(self.teacher_modules(), self.student_modules()):
            for t, s in zip(t_mod.parameters(), s_mod.parameters()):
                if s.requires_grad:
                    teacher.append(t)
                    student.append(s)
        return teacher, student

    # -- the two branches ---------------------------------------------------------------------------------------
    def predict(self, view1: torch.Tensor, keep: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Online branch: ``view1`` ``(B, 3, S, S)``, ``keep`` ``(B, L_vis)`` visible patches of view A, ``boxes``
        ``(B, 2, 4)``, ``flips`` ``(B, 2)`` -> ``(B, L, decoder_dim)`` predictions of view B's patch tokens."""
        tokens = vit_tokens(self.student_encoder, view1, keep, final_norm=False)  # (B, 1 + L_vis, D)
        z = self.projector(self.decoder_embed(tokens))  # (B, 1 + L_vis, Dd)
        pos, log_scale = relative_positions(boxes, flips, self.grid)
        rel = self.position_mlp(relative_embedding(pos, log_scale, self.decoder_pos.shape[-1]))  # (B, L, Dd)
        vis_pos = self.decoder_pos[1:][keep]  # (B, L_vis, Dd)
        x = torch.cat([z[:, :1] + self.decoder_pos[:1], z[:, 1:] + vis_pos, self.mask_token + rel], dim=1)
        return self.decoder_pred(self.predictor(x))[:, -self.num_patches:]

    @torch.no_grad()
    def target(self, view2: torch.Tensor) -> torch.Tensor:
        """Target branch: the full view B ``(B, 3, S, S)`` -> ``(B, L, decoder_dim)`` patch tokens (class dropped)."""
        tokens = vit_tokens(self.teacher_encoder, view2, final_norm=False)
        return self.teacher_projector(self.teacher_decoder_embed(tokens))[:, 1:]

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, mask: torch.Tensor, boxes: torch.Tensor,
                flip1: torch.Tensor, flip2: torch.Tensor, all_reduce=None) -> dict[str, torch.Tensor]:
        """One step's loss. ``mask`` ``(B, L)`` bool (True = masked, :attr:`num_masked` per row) is view A's
        (``view1``); ``boxes`` / ``flip*`` are the crops of A and B. ``all_reduce`` averages UniGrad's correlation
        matrices over ranks. Returns ``{"loss", "loss_dense", "loss_global", "loss_pos", "loss_neg",
        "target_std", "target_erank"}``."""
        keep = visible_indices(mask, self.num_patches - self.num_masked)
        pred = self.predict(view1, keep, boxes, torch.stack([flip1, flip2], dim=1))
        target = self.target(view2)
        loss, stats = sim_loss(pred, target, all_reduce=all_reduce, **self.loss_kwargs)
        return {"loss": loss, **stats}

    # -- what downstream stages read ------------------------------------------------------------------------------
    def student_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, H, W)`` -> ``(B, D, H / p, W / p)``: the online encoder's patch tokens (the exported
        trunk), any size that is a multiple of the patch."""
        return vit_feature_map(self.student_encoder, images)
