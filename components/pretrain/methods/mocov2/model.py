"""MoCo v2 (Chen, Fan, Girshick, He 2020, arXiv 2003.04297; MoCo: He et al., CVPR 2020): the image-level baseline.

A query encoder and a key encoder that follows it by momentum; InfoNCE against a queue of earlier keys
(:class:`MoCoV2`).
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.backbone import build_resnet, trunk_channels, trunk_forward
from components.pretrain.methods.mocov2.losses import enqueue, info_nce_queue

__all__ = ["Encoder", "MoCoV2", "MODEL_KWARGS", "model_kwargs_from_params"]

Collective = Callable[[torch.Tensor], torch.Tensor]

# ``pretrain.mocov2`` fields that are MoCoV2 constructor arguments (the same names)
MODEL_KWARGS = ("arch", "dim_hidden", "dim", "queue_size", "temperature", "bn_splits")


def model_kwargs_from_params(params: Any) -> dict[str, Any]:
    """``MoCoV2(**model_kwargs_from_params(cfg.mocov2))``; also what ``last.pt`` stores as ``model_kwargs``."""
    params = getattr(params, "mocov2", params)
    return {name: getattr(params, name) for name in MODEL_KWARGS}


class Encoder(nn.Module):
    """ResNet trunk (torchvision keys, no fc) → average pool → Linear(C, H) → ReLU → Linear(H, D): (B, 3, S, S) → (B, D).

    Weights as torchvision's default ResNet init (the MoCo code builds ``torchvision.models.resnet50()``).
    """

    def __init__(self, arch: str, dim_hidden: int, dim: int):
        super().__init__()
        self.backbone = build_resnet(arch, head="none")
        self.head = nn.Sequential(nn.Linear(trunk_channels(arch), dim_hidden), nn.ReLU(inplace=True),
                                  nn.Linear(dim_hidden, dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's map (B, C, S/32, S/32): what MoCo transfers."""
        return trunk_forward(self.backbone, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def encode_in_groups(encoder: nn.Module, x: torch.Tensor, splits: int) -> torch.Tensor:
    """L2-normalised ``encoder`` outputs of ``x`` (N, ...) with BatchNorm statistics per each of ``splits`` equal
    consecutive groups (N must be divisible by ``splits``): (N, D)."""
    if splits == 1:
        return F.normalize(encoder(x), dim=1)
    return F.normalize(torch.cat([encoder(part) for part in x.chunk(splits)]), dim=1)


class MoCoV2(nn.Module):
    """Momentum contrast with a queue.

    Attributes:
        query_encoder, key_encoder: :class:`Encoder`; the key encoder has ``requires_grad=False``.
        queue: (queue_size, dim) buffer of L2-normalised keys (random unit vectors at first, as MoCo).
        queue_ptr: () long buffer, the index of the oldest entry.

    A query encoder (ResNet trunk → global average pool → 2-layer MLP head, v2's change over v1) and a key encoder
    that follows it by momentum (``θ_k ← m·θ_k + (1 − m)·θ_q``, updated by the method after each optimiser step, not
    here); InfoNCE against a queue of keys of earlier batches (:mod:`components.pretrain.methods.mocov2.losses`). One
    direction per step, as the paper: view 1 is the query, view 2 the key.

    BatchNorm (MoCo Sec. 3.3): both encoders compute BN statistics over groups of ``bn_splits`` equal parts of each
    rank's batch (MoCo's per-GPU BN, with ``bn_splits`` emulating more GPUs per process); the key encoder's groups are
    cut from a random permutation of the *global* batch (shuffle BN), so a query and its positive key never share
    statistics. With ``world · bn_splits = 1`` the shuffle changes nothing (the paper's "cheating" through BN is then
    possible).

    The model holds no schedule and reads no argv; collectives (``gather``) and the permutation are parameters, so the
    same forward runs on one CPU and under DDP, and 2 ranks with ``bn_splits = 1`` equal 1 process with
    ``bn_splits = 2`` on the concatenated batch.
    """

    def __init__(self, *, arch: str = "resnet50", dim_hidden: int = 2048, dim: int = 128, queue_size: int = 65536,
                 temperature: float = 0.2, bn_splits: int = 1):
        super().__init__()
        self.arch, self.dim, self.temperature, self.bn_splits = arch, dim, temperature, bn_splits
        self.query_encoder = Encoder(arch, dim_hidden, dim)
        self.key_encoder = copy.deepcopy(self.query_encoder)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def momentum_parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Matching lists (key, query) for the foreach momentum update (parameters only: each encoder keeps its own
        BN running statistics, as MoCo)."""
        return list(self.key_encoder.parameters()), list(self.query_encoder.parameters())

    @torch.no_grad()
    def _keys(self, view2: torch.Tensor, perm: torch.Tensor | None, gather: Collective | None, rank: int,
              world: int) -> torch.Tensor:
        """This rank's keys (B, D) in its own sample order, computed on shuffled BN groups of the global batch."""
        b = view2.shape[0]
        if perm is None:  # no shuffle: BN groups are consecutive slices of this rank's batch
            return encode_in_groups(self.key_encoder, view2, self.bn_splits)
        perm = perm.to(view2.device)
        x_all = gather(view2) if gather is not None else view2  # (world·B, 3, S, S), rank order
        mine = perm.view(world, b)[rank]  # the global samples this rank encodes
        k_mine = encode_in_groups(self.key_encoder, x_all[mine], self.bn_splits)
        k_all = gather(k_mine) if gather is not None else k_mine  # keys of perm[0], perm[1], ...
        k_orig = k_all[torch.argsort(perm)]  # back to the global order
        return k_orig[rank * b : (rank + 1) * b]

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *, perm: torch.Tensor | None = None,
                gather: Collective | None = None, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        """One MoCo v2 step (enqueues the keys as a side effect in training mode).

        Args:
            view1, view2: (B, 3, S, S) normalised views of this rank's B images (query / key).
            perm: (world·B,) the global shuffle of the key encoder's BN groups
                (:func:`components.pretrain.methods.mocov2.losses.shuffle_plan`), identical on every rank; None: no shuffle.
            gather: concatenation over ranks (``components.dist.gather_cat``); None on one process.
            rank, world: this process's rank and the world size (``gather`` is needed when ``world > 1``).
        Returns:
            loss: () InfoNCE (with graph). acc: () share of queries whose positive beats every negative.
            pos_sim, neg_sim: () mean cosine of a query to its key / to the queue (detached).
        """
        if world > 1 and gather is None:
            raise ValueError("world > 1 needs gather")
        q = encode_in_groups(self.query_encoder, view1, self.bn_splits)
        k = self._keys(view2, perm, gather, rank, world)
        # a copy: the queue is overwritten in place below, but backward still needs this step's negatives (MoCo too)
        loss, logits = info_nce_queue(q, k, self.queue.clone(), self.temperature)
        if self.training:
            queue, ptr = enqueue(self.queue, self.queue_ptr, k, gather)
            self.queue.copy_(queue)
            self.queue_ptr.copy_(ptr)
        with torch.no_grad():
            acc = (logits.argmax(dim=1) == 0).float().mean()
            pos_sim = logits[:, 0].mean() * self.temperature
            neg_sim = logits[:, 1:].mean() * self.temperature
        return {"loss": loss, "acc": acc, "pos_sim": pos_sim, "neg_sim": neg_sim}

    @torch.no_grad()
    def query_features(self, x: torch.Tensor) -> torch.Tensor:
        """The query trunk's map: (B, 3, H, W) → (B, C, H/32, W/32) (the transferred encoder)."""
        return self.query_encoder.features(x)
