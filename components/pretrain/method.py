"""What every pretraining method shares: the :class:`PretrainMethod` base (two-view batches from the plan's shards,
warm-up + cosine lr, the EMA teacher, what downstream stages ask of a model). The methods subclass it under
``components/pretrain/methods/``; :mod:`components.pretrain.registry` names them."""
from __future__ import annotations

from typing import Any, Callable

import torch

from components import dist
from components.data.loading.ledger import DataLossLedger
from components.engine.ema import ema_update_
from components.engine.method import Method
from components.engine.optim import WARMUP_START_FACTOR, lr_at, momentum_at, scaled_lr
from components.pretrain.augment import TwoViewAugment
from components.pretrain.plan import Plan
from components.pretrain.views import DrawCrops, batch_views, build_loader

class PretrainMethod(Method):
    """Base of the pretraining methods: two-view batches from the plan's shards, warm-up + cosine lr, cosine EMA.

    Data: two crops and their augmentation draws per image made in the loader workers, pixels batched on the device
    (on a CPU in the loader workers; :mod:`components.pretrain.views`). Schedules (:mod:`components.engine.optim`, pure functions of the global
    step): ``lr = base_lr * batch / 256``, linear warm-up then cosine to ``min_lr``; the teacher's EMA momentum on a
    cosine from ``m0`` to 1.
    Subclasses set ``name``, ``stat_keys``, ``plot_keys``, ``backbone_prefix``, ``model_class`` and implement
    :meth:`model_kwargs`, :meth:`optimizer`, :meth:`forward` (and :meth:`ema_pairs` when the model names its EMA
    pairs otherwise). ``self.params`` is the method's subsection of ``pretrain`` (``cfg.slotcon`` ...).
    """

    name = "base"
    model_class: type[torch.nn.Module]  # built from ``model_kwargs`` (here and by the downstream stages)
    plot_keys: tuple[str, ...] = ("loss",)  # columns of loss.csv / loss.png
    backbone_prefix = ""  # state_dict prefix of the trunk that export writes (torchvision keys after it)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_min_overlap = 0.01  # view 2 covers >= this share of its area inside view 1 (SlotCon); 0: independent crops
    prefetch = True  # on CUDA: decode + augment the next batch on a side stream during the step
    warmup_start_factor = WARMUP_START_FACTOR  # the warm-up's first lr is this share of the peak (SlotCon: 1/100)

    def __init__(self, cfg, plan: Plan, device: torch.device):
        self.cfg, self.plan, self.device = cfg, plan, device
        self.params = cfg.method_params
        self.global_batch = plan.global_batch
        self.peak_lr = scaled_lr(self.params.base_lr, plan.global_batch)
        self.decode = "bytes" if device.type == "cuda" else "rgb"
        self.augment = TwoViewAugment(image_size=cfg.image_size).to(device)
        self.lost = DataLossLedger(dict(zip(plan.urls, plan.shard_samples)))  # what the run never received
        self._per_model: dict[str, tuple[torch.nn.Module, Any]] = {}

    # -- what subclasses provide ------------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the model (stored in ``last.pt`` so downstream stages rebuild it)."""
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        return self.model_from_kwargs(self.model_kwargs())

    @classmethod
    def model_from_kwargs(cls, kwargs: dict[str, Any]) -> torch.nn.Module:
        """The model from stored ``model_kwargs`` (downstream stages rebuild it from ``last.pt`` this way)."""
        return cls.model_class(**kwargs)

    def ema_pairs(self, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The ``(teacher, student)`` tensor lists the EMA teacher follows by: the model's ``ema_parameters()``."""
        return model.ema_parameters()

    # -- what downstream stages ask of a pretrained model (unsup_seg, viz) ------------------------------------------------
    @staticmethod
    def dense_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, 3, H, W)`` -> the dense features the method transfers, ``(B, D, h, w)``."""
        raise NotImplementedError

    @staticmethod
    def prototype_scores(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor | None:
        """``(B, K, h, w)`` scores against learned prototypes (SlotCon), or None: downstream then clusters
        :meth:`dense_features` with k-means (K = number of classes)."""
        return None

    # -- engine hooks -----------------------------------------------------------------------------------------------
    def build(self, device: torch.device) -> torch.nn.Module:
        torch.manual_seed(self.cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        model = self.build_model().to(device)
        if device.type == "cuda" and self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)  # NHWC convs: tensor cores without transposes
        return model

    def lr_at(self, step: int) -> float:
        return lr_at(step, peak_lr=self.peak_lr, min_lr=self.params.min_lr, warmup_steps=self.plan.warmup_steps,
                     total_steps=self.plan.total_steps, start_factor=self.warmup_start_factor)

    def momentum_at(self, step: int) -> float | None:
        m0 = getattr(self.params, "teacher_momentum", None)
        return None if m0 is None else momentum_at(step, base_momentum=m0, total_steps=self.plan.total_steps)

    def after_update(self, model: torch.nn.Module, step: int, momentum: float | None) -> None:
        """The EMA teacher follows the student, ``teacher = m * teacher + (1 - m) * student``, in fused kernels
        (:func:`components.engine.ema.ema_update_`) over the :meth:`ema_pairs` lists."""
        teacher, student = self.per_model(model, "ema", self.ema_pairs)
        ema_update_(teacher, student, momentum)

    def per_model(self, model: torch.nn.Module, what: str, build: Callable[[torch.nn.Module], Any]) -> Any:
        """``build(model)``, computed once per model object (every step hands the same unwrapped module)."""
        cached = self._per_model.get(what)
        if cached is None or cached[0] is not model:
            cached = self._per_model[what] = (model, build(model))
        return cached[1]

    def batches(self, epoch: int):
        loader = build_loader(self.plan.urls, rank_batch=self.plan.rank_batch,
                              samples_per_epoch=self.plan.samples_per_epoch, seed=self.cfg.seed, epoch=epoch,
                              rank=self.plan.rank, world_size=self.plan.world_size, num_workers=self.cfg.num_workers,
                              decode=self.decode, expected_counts=self.lost.expected,
                              pin_memory=self.device.type == "cuda", map_fn=self.crop_drawer(epoch),
                              augment=self.augment if self.decode == "rgb" else None)
        return self._count_lost(loader)

    def crop_drawer(self, epoch: int):
        """The loader workers' per-sample draw (:class:`~components.pretrain.views.DrawCrops`: two crop boxes and
        flips); a method that needs more per sample returns a subclass (SIM: view A's block mask)."""
        return DrawCrops(self.cfg.seed, epoch, self.plan.rank, self.crop_scale, self.crop_min_overlap)

    def _count_lost(self, loader):
        """The loader's batches, its loss records folded into :attr:`lost` before each batch is handed on; every
        ``log_every_steps`` batches and at the epoch's last one, the ranks merge their counts and all stop together
        (:class:`UserError`) when more than ``max_lost_fraction`` of the data is lost. The batch index is the same on
        every rank (resampled: equal batch counts), so the merge's collective lines up."""
        every, n, seen = self.cfg.log_every_steps, len(loader), 0
        for i, batch in enumerate(loader):
            self.lost.add_records(loader.errors[seen:])
            seen = len(loader.errors)
            if i % every == 0 or i == n - 1:
                self.check_lost()
            yield batch

    def check_lost(self) -> None:
        """Merge every rank's lost-sample counts and stop (every rank) above ``pretrain.max_lost_fraction``."""
        self.lost.merge(device=self.device if dist.is_initialized() and
                        torch.distributed.get_backend() == "nccl" else "cpu")
        self.lost.check(self.cfg.max_lost_fraction)

    def prepare(self, batch: dict, device: torch.device) -> dict:
        views = batch_views(batch, self.augment, device)
        self.lost.add_dropped((url, key) for url, key, _ in views.pop("dropped", ()))
        return views

    def state_dict(self) -> dict[str, Any]:
        return {"lost": self.lost.state_dict()}

    def load_state_dict(self, state) -> None:
        self.lost.load_state_dict(state.get("lost", {}))

    def compile(self, model: torch.nn.Module) -> None:
        model.compile()
