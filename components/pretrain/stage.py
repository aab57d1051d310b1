"""``slotcon pretrain``: self-supervised pretraining from WebDataset shards on one CPU, one GPU, or GPUs over nodes.

``pretrain.method`` picks the method (``slotcon`` by default; see :data:`METHODS`); everything else is shared:

- the **plan** (:func:`make_plan`): the pretrain splits of the shards, batch split over ranks, schedule lengths, a
  signature of the data (changed shards -> a new run, never a resumed old one);
- the **data**: two crops per image drawn in the loader workers, pixels batched on the device
  (:mod:`components.pretrain.views`);
- the **schedules**: ``lr = base_lr * batch / 256``, linear warm-up then cosine to ``min_lr``; the teacher's EMA
  momentum on a cosine from ``m0`` to 1 (:mod:`components.engine.optim`, pure functions of the global step);
- the **loop**: :func:`components.engine.loop.fit` (checkpoints + exact resume, all-rank non-finite stop, logging,
  DDP); the stage runtime (:mod:`components.stage`) launches torchrun itself when ``nproc_per_node * nnodes > 1``;
- the **outputs**: ``models/pretrain/last.pt`` (``{"model", "model_kwargs", "method", "arch", "backbone_prefix",
  ...}``: what export, unsup_seg and viz read), the metrics, ``plots/pretrain/loss.{csv,png}``.

A method is a :class:`PretrainMethod` subclass: it builds its model, names its optimiser and its stats, computes the
losses of a pair of views, and updates its EMA teacher. ``docs/ARCHITECTURE.md`` shows how to add one.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from components import dist
from components.errors import UserError
from components.stage import Arg, Stage
from components.engine.loop import Method, NonFiniteLossError, RunSpec, fit, write_loss_plot  # noqa: F401
from components.engine.optim import lr_at, momentum_at, scaled_lr

#: ``pretrain.method`` -> the :class:`PretrainMethod` subclass (imported lazily)
METHODS: dict[str, str] = {
    "slotcon": "components.pretrain.methods.slotcon.method:SlotConMethod",
    "sim": "components.pretrain.methods.sim.method:SimMethod",
    "mocov2": "components.pretrain.methods.mocov2.method:MocoV2Method",
}


def method_class(name: str) -> type["PretrainMethod"]:
    if name not in METHODS:
        raise UserError(f"params: pretrain.method={name!r} is not known (allowed: {', '.join(METHODS)})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


# --------------------------------------------------------------------------------------------------------------------
# the plan: everything derived from cfg + shards before any expensive work
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    urls: tuple[str, ...]
    num_images: int
    samples_per_epoch: int
    world_size: int
    rank: int
    global_batch: int
    rank_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    data_signature: str
    shard_samples: tuple[int, ...] = ()  # samples written to each shard of ``urls`` (index.json): lost-sample counts


def make_plan(cfg, shards_root: str | os.PathLike, world_size: int, rank: int) -> Plan:
    """Resolve shards, batch split and schedule lengths; UserError (one line) on anything that cannot work."""
    from components.data.shards.stage import expected_counts, read_index, split_urls

    index = read_index(shards_root)
    splits = list(index.get("pretrain") or [])
    if not splits:
        raise UserError(f"{Path(shards_root) / 'index.json'}: no 'pretrain' splits listed; re-run `slotcon shard`")
    urls: list[str] = []
    shard_samples: list[int] = []
    num_images = 0
    for split in splits:
        info = index["splits"].get(split)
        if info is None:
            raise UserError(f"{Path(shards_root) / 'index.json'}: pretrain split {split!r} is not in 'splits'; "
                            "re-run `slotcon shard`")
        split_shards = split_urls(shards_root, split)
        counts = expected_counts(shards_root, split)
        urls += split_shards
        shard_samples += [counts[u] for u in split_shards]
        num_images += int(info["num_samples"])
    if not urls or num_images == 0:
        raise UserError(f"{shards_root}: the pretrain splits {splits} hold no shards/images; re-run `slotcon shard`")
    if cfg.batch_size % world_size:
        raise UserError(f"params: pretrain.batch_size={cfg.batch_size} is not divisible by world size {world_size}")
    samples = cfg.samples_per_epoch or num_images
    steps_per_epoch = samples // cfg.batch_size
    if steps_per_epoch < 1:
        raise UserError(f"params: pretrain.batch_size={cfg.batch_size} exceeds the {samples} samples per epoch; "
                        "lower batch_size or raise samples_per_epoch")
    signature = hashlib.sha256(
        json.dumps({s: index["splits"][s] for s in splits}, sort_keys=True, default=str).encode()
    ).hexdigest()[:12]
    return Plan(
        urls=tuple(urls), num_images=num_images, samples_per_epoch=steps_per_epoch * cfg.batch_size,
        world_size=world_size, rank=rank, global_batch=cfg.batch_size, rank_batch=cfg.batch_size // world_size,
        steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * cfg.epochs,
        warmup_steps=steps_per_epoch * cfg.warmup_epochs, data_signature=signature, shard_samples=tuple(shard_samples),
    )


# --------------------------------------------------------------------------------------------------------------------
# what every pretraining method shares
# --------------------------------------------------------------------------------------------------------------------
class PretrainMethod(Method):
    """Base of the pretraining methods: two-view batches from the plan's shards, warm-up + cosine lr, cosine EMA.

    Subclasses set ``name``, ``stat_keys``, ``plot_keys``, ``backbone_prefix`` and implement :meth:`build_model`,
    :meth:`optimizer`, :meth:`forward` (and :meth:`after_update` for an EMA teacher). ``self.params`` is the method's
    subsection of ``pretrain`` (``cfg.slotcon`` ...).
    """

    name = "base"
    plot_keys: tuple[str, ...] = ("loss",)  # columns of loss.csv / loss.png
    backbone_prefix = ""  # state_dict prefix of the trunk that export writes (torchvision keys after it)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_min_overlap = 0.01  # view 2 covers >= this share of its area inside view 1 (SlotCon); 0: independent crops
    prefetch = True  # on CUDA: decode + augment the next batch on a side stream during the step

    def __init__(self, cfg, plan: Plan, device: torch.device):
        from components.pretrain.augment import TwoViewAugment
        from components.pretrain.views import augment_generator

        self.cfg, self.plan, self.device = cfg, plan, device
        self.params = cfg.method_params
        self.global_batch = plan.global_batch
        self.peak_lr = scaled_lr(self.params.base_lr, plan.global_batch)
        self.decode = "bytes" if device.type == "cuda" else "rgb"
        self.augment = TwoViewAugment(image_size=cfg.image_size).to(device)
        self.generator = augment_generator(cfg.seed, plan.rank)
        from components.data.loading.ledger import DataLossLedger

        self.lost = DataLossLedger(dict(zip(plan.urls, plan.shard_samples)))  # what the run never received

    # -- what subclasses provide ------------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the model (stored in ``last.pt`` so downstream stages rebuild it)."""
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        return self.model_from_kwargs(self.model_kwargs())

    @classmethod
    def model_from_kwargs(cls, kwargs: dict[str, Any]) -> torch.nn.Module:
        """The model from stored ``model_kwargs`` (downstream stages rebuild it from ``last.pt`` this way)."""
        raise NotImplementedError

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
                     total_steps=self.plan.total_steps)

    def momentum_at(self, step: int) -> float | None:
        m0 = getattr(self.params, "teacher_momentum", None)
        return None if m0 is None else momentum_at(step, base_momentum=m0, total_steps=self.plan.total_steps)

    def batches(self, epoch: int):
        from components.pretrain.views import build_loader

        loader = build_loader(self.plan.urls, rank_batch=self.plan.rank_batch,
                              samples_per_epoch=self.plan.samples_per_epoch, seed=self.cfg.seed, epoch=epoch,
                              rank=self.plan.rank, world_size=self.plan.world_size, num_workers=self.cfg.num_workers,
                              decode=self.decode, expected_counts=self.lost.expected,
                              pin_memory=self.device.type == "cuda", map_fn=self.crop_drawer(epoch))
        return self._count_lost(loader)

    def crop_drawer(self, epoch: int):
        """The loader workers' per-sample draw (:class:`~components.pretrain.views.DrawCrops`: two crop boxes and
        flips); a method that needs more per sample returns a subclass (SIM: view A's block mask)."""
        from components.pretrain.views import DrawCrops

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
        from components.pretrain.views import make_views

        views = make_views(batch, self.augment, self.generator, device)
        self.lost.add_dropped((url, key) for url, key, _ in views.pop("dropped", ()))
        return views

    def generators(self) -> list[torch.Generator]:
        return [self.generator]

    def state_dict(self) -> dict[str, Any]:
        return {"lost": self.lost.state_dict()}

    def load_state_dict(self, state) -> None:
        self.lost.load_state_dict(state.get("lost", {}))

    def compile(self, model: torch.nn.Module) -> None:
        model.compile()


# --------------------------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------------------------
def cpu_threads(current: int, num_workers: int, cores: int | None = None) -> int:
    """Intra-op threads for CPU training: at most the cores left after one per loader worker (which decode JPEGs on
    CPU). Oversubscribed OpenMP threads spin at their barriers: on a busy 2-core box the demo took 162 s with 2
    threads and 35 s with 1; an idle box loses at most the second thread's share of the convolutions."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(current, cores - num_workers))


def fingerprint_of(cfg, plan: Plan) -> dict[str, Any]:
    """What defines the run: the shared params, the chosen method's subsection only, the data and the epoch size."""
    # max_lost_fraction changes no step: raising it after a stop resumes the same run
    shared = {k: v for k, v in cfg.model_dump().items() if k not in METHODS and k != "max_lost_fraction"}
    return {**shared, "params": cfg.method_params.model_dump(), "samples_per_epoch": plan.samples_per_epoch,
            "data": plan.data_signature}


def run_pretrain(
    cfg,
    shards_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    ckpt_dir: str | os.PathLike,
    metrics_path: str | os.PathLike | None = None,
    plots_dir: str | os.PathLike | None = None,
    tracker=None,
    *,
    device: str | torch.device | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    stop_after_step: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain ``cfg.method`` on the pretrain splits of ``shards_root``; write ``out_dir/last.pt`` and the records.

    Args:
        cfg: :class:`components.config.PretrainConfig`.
        shards_root: folder with ``index.json`` (stage ``shard``).
        out_dir: receives ``last.pt``.
        ckpt_dir: resumable checkpoints, ``<ckpt_dir>/<fingerprint>/step_*.pt`` (outside DVC's outs).
        metrics_path: written by rank 0 when given (the stage runtime writes it otherwise).
        plots_dir: ``loss.csv`` (epoch + the method's loss parts) and ``loss.png``.
        tracker: :class:`components.tracking.runs.Tracker` (no-op off rank 0).
        device: override (default: ``cuda:LOCAL_RANK`` if CUDA is available, else CPU).
        on_step: ``on_step(step, stats)`` after every optimiser step (rank-mean floats; tests, tools).
        stop_after_step: return right after this global step (a clean stand-in for a kill in tests).
        progress: a tqdm bar on rank 0.
    Returns:
        the metrics dict, or ``{"stopped_at_step": n}`` when stopped early.
    """
    from components.tracking.runs import Tracker

    tracker = tracker or Tracker()
    if device is None:
        device = torch.device(f"cuda:{dist.get_local_rank()}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    own_group = not dist.is_initialized() and dist.init_distributed(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(threads, cfg.num_workers))
    elif device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest conv algorithms once
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside bf16 autocast
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        plan = make_plan(cfg, shards_root, world, rank)
        method = method_class(cfg.method)(cfg, plan, device)
        if rank == 0:
            tracker.log_params({"global_batch": plan.global_batch, "world_size": world, "steps_per_epoch":
                                plan.steps_per_epoch, "total_steps": plan.total_steps, "peak_lr": method.peak_lr,
                                "num_images": plan.num_images, "device": str(device), "decode": method.decode},
                               prefix="pretrain.plan.")
            tracker.set_tags({"method": cfg.method})
        spec = RunSpec(total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch,
                       log_every=cfg.log_every_steps, save_every=cfg.save_every_steps, amp=cfg.amp,
                       channels_last=cfg.channels_last, compile=cfg.compile, label=f"pretrain[{cfg.method}]",
                       progress=progress)
        result = fit(method, spec, ckpt_dir=ckpt_dir, fingerprint=fingerprint_of(cfg, plan), tracker=tracker,
                     device=device, on_step=on_step, stop_after_step=stop_after_step)
        if result.stopped:
            return {"stopped_at_step": result.step}
        method.check_lost()  # every rank: the final merged count (and the stop, if the last batches passed the limit)
        metrics: dict[str, Any] = {}
        if rank == 0:
            metrics = _records(cfg, plan, method, result, out_dir, metrics_path, plots_dir, tracker)
        dist.barrier()
        return metrics
    finally:
        torch.set_num_threads(threads)
        if own_group:
            torch.distributed.destroy_process_group()


def _records(cfg, plan: Plan, method: PretrainMethod, result, out_dir, metrics_path, plots_dir, tracker) -> dict:
    """Rank 0: metrics, ``last.pt``, loss curves, final MLflow figures."""
    from components.io import save_torch_atomic, write_json_atomic
    from components.engine.loop import gpu_mem_gb

    history = result.history
    last = history[-1] if history else {}
    keys = method.stat_keys
    metrics: dict[str, Any] = {
        "method": cfg.method,
        **{k: last.get(k, result.last_stats.get(k, float("nan"))) for k in keys},
        "first_epoch_loss": history[0]["loss"] if history else float("nan"),
        "epochs": len(history),
        "steps": result.step,
        "steps_this_run": result.steps_this_run,
        "train_time_s": round(result.train_time_s, 3),
        "img_per_s": round(result.img_per_s, 2),
        "global_batch": plan.global_batch,
        "world_size": plan.world_size,
        "peak_lr": method.peak_lr,
        "gpu_mem_gb": round(gpu_mem_gb(result.extra["device"]), 3),
        "resumed": result.resumed_from is not None,
        "lost_samples": method.lost.lost,  # of the pretraining shards, over all ranks (see components.data.loading.ledger)
        "lost_fraction": method.lost.fraction,
    }
    raw = result.extra["model"]
    last_pt = Path(out_dir) / "last.pt"
    save_torch_atomic({
        "model": raw.state_dict(), "model_kwargs": method.model_kwargs(), "method": cfg.method,
        "arch": cfg.arch, "backbone_prefix": method.backbone_prefix, "epoch": len(history), "step": result.step,
        "history": history, "config": cfg.model_dump(), "fingerprint_hash": result.extra["fingerprint_hash"],
        "metrics": metrics,
    }, last_pt)
    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        write_loss_plot(history, plots_dir / "loss.csv", plots_dir / "loss.png", x="epoch", ys=method.plot_keys,
                        title=f"{cfg.method} pretraining")
        tracker.log_artifact(plots_dir / "loss.png", "plots")
    if metrics_path is not None:
        write_json_atomic(metrics_path, metrics)
    tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=result.step)
    print(f"slotcon pretrain: {cfg.method}, {result.step} steps, loss {metrics['loss']:.4f} (first epoch "
          f"{metrics['first_epoch_loss']:.4f}), {metrics['img_per_s']:.1f} img/s, {result.train_time_s:.1f} s "
          f"-> {last_pt}", file=sys.stderr)
    if metrics["lost_samples"]:
        shards = ", ".join(f"{u}: {n}" for u, n in sorted(method.lost.per_shard().items()))
        print(f"slotcon pretrain: warning: {metrics['lost_samples']} of {method.lost.total} samples lost "
              f"({metrics['lost_fraction']:.3%}, within pretrain.max_lost_fraction={cfg.max_lost_fraction:g}): "
              f"{shards}", file=sys.stderr)
    return metrics


def _run_stage(ctx) -> dict[str, Any]:
    a = ctx.args
    return run_pretrain(ctx.cfg, a.shards, a.out, a.checkpoints, None, a.plots, tracker=ctx.tracker)


STAGE = Stage(
    name="pretrain", section="pretrain", run=_run_stage, metrics="metrics/pretrain.json", distributed=True,
    headline=("loss", "train_time_s"),
    args=(Arg("shards", "data/shards", "shard root with index.json"),
          Arg("out", "models/pretrain", "receives last.pt"),
          Arg("checkpoints", "checkpoints/pretrain", "resumable checkpoints (not a DVC out)"),
          Arg("plots", "plots/pretrain", "loss.csv + loss.png")),
)
