"""``slotcon pretrain``: SlotCon pretraining from WebDataset shards on one CPU, one GPU, or many GPUs over nodes.

The way a batch goes (paper Sec. 3 / the official recipe, re-plumbed for throughput):

1. CPU loader workers (:func:`components.data.loader.make_loader`, resampled so every rank gets the same number of
   batches) read shards and only draw each sample's two crop boxes and flips
   (:func:`components.slotcon.transforms.sample_two_crops`) with a generator seeded from
   ``(seed, epoch, rank, worker, key, occurrence)`` -- never from DataLoader worker RNG, so a restarted epoch draws the
   same crops. On CUDA they pass the JPEG bytes through untouched; on CPU they decode to uint8 RGB.
2. On the device: JPEGs are batch-decoded by nvJPEG (``torchvision.io.decode_jpeg(list, device="cuda")``), then
   :class:`components.slotcon.augment.TwoViewAugment` crops/resizes, colour-jitters, blurs and solarizes the whole
   batch with per-sample parameters from one seeded generator per rank (saved in checkpoints).
3. :class:`components.slotcon.model.SlotCon` computes ``λ·L_group + (1 − λ)·L_slot`` under bf16 autocast (CUDA),
   with negatives gathered and the center all-reduced over ranks (``components.dist``); DDP averages gradients
   (SyncBatchNorm on CUDA as the official recipe; plain per-rank BN on CPU, where torch has no SyncBN).
4. LARS step with ``lr = lr_at(step)``, then the teacher EMA with ``m = momentum_at(step)`` (pure functions of the
   global step, :mod:`components.train.optim`), vectorised with ``torch._foreach_*`` (:mod:`components.train.ema`).

Every step all-reduces one small vector (loss parts + a non-finite flag), so a NaN on any rank stops every rank at
the same step with an error naming it, before the bad update; the last good checkpoint stays. Checkpoints
(:mod:`components.train.checkpoint`) are written every ``save_every_steps`` and at each epoch end; a re-run resumes
from the newest one with the same config fingerprint, bit-exactly on CPU (same loader stream, RNG states, step).

When ``pretrain.nproc_per_node * nnodes > 1`` and we are not already under ``torchrun``, :func:`main` launches
``python -m torch.distributed.run ... -m components pretrain <same args>`` itself, so ``dvc repro`` is one command
everywhere. Multi-node: run the same command on every node with ``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK``
set (see README).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from components import dist
from components.errors import UserError
from components.train import checkpoint as ckpt
from components.train.ema import ema_update_
from components.train.optim import build_optimizer, lr_at, momentum_at, scaled_lr, set_lr

STAT_KEYS = ("loss", "loss_group", "loss_slot", "num_slots", "assign_entropy")
PLOT_COLUMNS = ("epoch", "loss", "loss_group", "loss_slot")


class NonFiniteLossError(UserError):
    """A non-finite loss on some rank: every rank raises it at the same step (the last good checkpoint is kept)."""


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
    peak_lr: float
    data_signature: str


def make_plan(cfg, shards_root: str | os.PathLike, world_size: int, rank: int) -> Plan:
    """Resolve shards, batch split and schedule lengths; UserError (one line) on anything that cannot work."""
    from components.data.shards import read_index, split_urls

    index = read_index(shards_root)
    splits = list(index.get("pretrain") or [])
    if not splits:
        raise UserError(f"{Path(shards_root) / 'index.json'}: no 'pretrain' splits listed; re-run `slotcon shard`")
    urls: list[str] = []
    num_images = 0
    for split in splits:
        info = index["splits"].get(split)
        if info is None:
            raise UserError(f"{Path(shards_root) / 'index.json'}: pretrain split {split!r} is not in 'splits'; "
                            "re-run `slotcon shard`")
        urls += split_urls(shards_root, split)
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
        urls=tuple(urls),
        num_images=num_images,
        samples_per_epoch=steps_per_epoch * cfg.batch_size,
        world_size=world_size,
        rank=rank,
        global_batch=cfg.batch_size,
        rank_batch=cfg.batch_size // world_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * cfg.epochs,
        warmup_steps=steps_per_epoch * cfg.warmup_epochs,
        peak_lr=scaled_lr(cfg.base_lr, cfg.batch_size),
        data_signature=signature,
    )


# --------------------------------------------------------------------------------------------------------------------
# loader side (runs in CPU workers): crop parameters from a generator seeded by the sample, not by worker RNG
# --------------------------------------------------------------------------------------------------------------------
def _sample_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def _image_size(sample: dict) -> tuple[int, int]:
    """(height, width) of a sample: from the decoded tensor, else the COCO record, else the JPEG header."""
    img = sample["image"]
    if isinstance(img, torch.Tensor) and img.ndim == 3:
        return int(img.shape[-2]), int(img.shape[-1])
    rec = (sample.get("meta") or {}).get("image") or {}
    if rec.get("height") and rec.get("width"):
        return int(rec["height"]), int(rec["width"])
    from PIL import Image

    with Image.open(io.BytesIO(bytes(img))) as im:  # reads the header only
        return im.height, im.width


class DrawCrops:
    """``map_fn`` for the loader: adds ``sample["crops"] = sample_two_crops(h, w, generator)``.

    The generator is seeded from ``(seed, epoch, rank, worker id, key, n-th time this worker sees the key)``: the
    resampled loader may repeat an image within an epoch, and a repeat gets new crops, while a restarted epoch (resume)
    re-draws exactly the same ones.
    """

    def __init__(self, seed: int, epoch: int, rank: int):
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self._seen: dict[str, int] = {}

    def __call__(self, sample: dict) -> dict:
        from components.slotcon.transforms import sample_two_crops

        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        key = sample["key"]
        n = self._seen[key] = self._seen.get(key, -1) + 1
        gen = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, self.rank, worker, key, n))
        h, w = _image_size(sample)
        sample["crops"] = sample_two_crops(h, w, gen)
        return sample


def collate_pairs(samples: list[dict]) -> dict[str, Any]:
    """Worker-side collate: images stay a list (sizes differ; JPEG bytes become uint8 tensors for nvJPEG), crop
    parameters are stacked: boxes (B, 2, 4), flips (B, 2), coords (B, 2, 4), fallback (B,)."""
    from components.slotcon.transforms import collate_crop_params

    images = []
    for s in samples:
        img = s["image"]
        if not isinstance(img, torch.Tensor):
            img = torch.frombuffer(bytearray(img), dtype=torch.uint8)
        images.append(img)
    batch: dict[str, Any] = {"images": images, "keys": [s["key"] for s in samples]}
    batch.update(collate_crop_params([s["crops"] for s in samples]))
    return batch


def build_loader(cfg, plan: Plan, epoch: int, decode: str):
    """This rank's loader for ``epoch``: resampled with ``steps_per_epoch`` batches of ``rank_batch`` per rank."""
    from components.data.loader import make_loader

    return make_loader(
        list(plan.urls),
        batch_size=plan.rank_batch,
        decode=decode,
        map_fn=DrawCrops(cfg.seed, epoch, plan.rank),
        collate_fn=collate_pairs,
        shuffle=True,
        resampled=True,
        samples_per_epoch=plan.samples_per_epoch,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        epoch=epoch,
        rank=plan.rank,
        world_size=plan.world_size,
        drop_last=True,
    )


# --------------------------------------------------------------------------------------------------------------------
# device side
# --------------------------------------------------------------------------------------------------------------------
def decode_images(images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG byte tensors -> (3, H, W) uint8 RGB on ``device`` (nvJPEG batch decode on CUDA); decoded tensors move."""
    if images and images[0].ndim == 1:
        from torchvision.io import ImageReadMode, decode_jpeg

        if device.type == "cuda":
            try:
                return decode_jpeg(images, device=device, mode=ImageReadMode.RGB)
            except RuntimeError:  # a JPEG nvJPEG can't take (rare CMYK/odd sampling): this batch on the CPU instead
                from components.data.loader import decode_rgb

                return [decode_rgb(bytes(b.numpy())).to(device, non_blocking=True) for b in images]
        return [decode_jpeg(b, mode=ImageReadMode.RGB) for b in images]
    return [im.to(device, non_blocking=True) for im in images]


def make_views(batch: dict, augment: torch.nn.Module, generator: torch.Generator, device: torch.device) -> dict:
    """Loader batch -> the keyword arguments of ``SlotCon.forward`` (view1, view2, coords1/2, flip1/2)."""
    images = decode_images(batch["images"], device)
    crops = {k: batch[k].to(device, non_blocking=True) for k in ("boxes", "flips", "coords")}
    return augment(images, crops, generator=generator)


def _seed_generator(seed: int, rank: int) -> torch.Generator:
    """The rank's augmentation generator: on the CPU (TwoViewAugment draws a few numbers per sample there, so the
    branch masks need no device sync and CPU/GPU runs draw the same parameters); its state goes in checkpoints."""
    return torch.Generator().manual_seed(_sample_seed("augment", seed, rank))


def _gpu_mem_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _find_resume_state(run_dir: Path, is_main: bool) -> tuple[Path, dict] | None:
    """Rank 0 picks the newest checkpoint; every rank resumes from that same one (read from a shared filesystem, or
    sent by rank 0 when another node cannot see the file), so ranks can never start from different steps."""
    found = ckpt.find_latest(run_dir) if is_main else None
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return found
    meta = [str(found[0]) if found else None]
    torch.distributed.broadcast_object_list(meta, src=0)
    if meta[0] is None:
        return None
    path = Path(meta[0])
    state = found[1] if is_main else (ckpt.load_checkpoint(path) if path.is_file() else None)
    missing = dist.any_rank(state is None, device=_collective_device())
    if missing:  # node-local checkpoint dirs: ship rank 0's state (once per resume)
        box = [state if is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        state = box[0]
    return path, state


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class StepRunner:
    """One optimisation step exactly as the loop runs it (the benchmark times this same code).

    Wraps ``model`` for the run: SyncBatchNorm + DDP when ``world > 1`` (SyncBN on CUDA only: torch has none on CPU,
    where each rank normalises with its own half-batch statistics), ``nn.Module.compile`` of both encoders when
    ``cfg.compile`` (in place, so state_dict keys stay plain), bf16 autocast on CUDA when ``cfg.amp``.
    """

    def __init__(self, model: torch.nn.Module, cfg, device: torch.device, world: int):
        cuda = device.type == "cuda"
        self.raw = model
        if dist.is_initialized() and world > 1:
            if cuda:
                self.raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the official recipe
            model = torch.nn.parallel.DistributedDataParallel(
                self.raw, device_ids=[device.index] if cuda else None, broadcast_buffers=True
            )
        else:
            model = self.raw
        if cfg.compile:
            self.raw.student_encoder.compile()
            self.raw.teacher_encoder.compile()
        self.model = model
        self.channels_last = cuda and cfg.channels_last
        self.teacher_params, self.student_params = self.raw.ema_parameters()
        self.gather = dist.gather_cat if world > 1 else None
        self.all_reduce = dist.all_reduce_mean if world > 1 else None
        self.amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (cuda and cfg.amp) else contextlib.nullcontext

    def __call__(self, views: dict, optimizer: torch.optim.Optimizer, lr: float, momentum: float) -> torch.Tensor:
        """Forward, check, backward, optimiser step, EMA. Returns the rank-SUM over ranks of
        ``[loss, loss_group, loss_slot, num_slots, assign_entropy, non-finite flag]`` on the CPU; when the flag is
        > 0 (any rank saw a non-finite loss) nothing was updated, on any rank."""
        set_lr(optimizer, lr)
        if self.channels_last:  # match the NHWC weights, so cuDNN needs no layout transposes
            views = dict(views, **{k: views[k].contiguous(memory_format=torch.channels_last) for k in ("view1", "view2")})
        with self.amp():
            out = self.model(**views, gather=self.gather, all_reduce=self.all_reduce)
        loss = out["loss"]
        # one collective per step: the stats and how many ranks saw a non-finite loss
        vec = torch.stack([out[k].detach().float() for k in STAT_KEYS] + [(~torch.isfinite(loss.detach())).float()])
        vec = dist.all_reduce_sum(vec).cpu()
        if vec[-1].item() > 0:
            return vec
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update_(self.teacher_params, self.student_params, momentum)
        return vec


# --------------------------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------------------------
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
    """Pretrain SlotCon on the pretrain splits of ``shards_root``; write ``out_dir/last.pt`` and the records.

    Args:
        cfg: :class:`components.config.PretrainConfig`.
        shards_root: folder with ``index.json`` (stage ``shard``).
        out_dir: receives ``last.pt`` = ``{"model", "model_kwargs", "arch", "epoch", "step", "history", ...}``.
        ckpt_dir: resumable checkpoints, ``<ckpt_dir>/<fingerprint>/step_*.pt`` (outside DVC's outs).
        metrics_path: ``metrics/pretrain.json`` (rank 0 writes it), optional.
        plots_dir: ``loss.csv`` (epoch, loss, loss_group, loss_slot) and ``loss.png``, optional.
        tracker: :class:`components.tracking.Tracker` (no-op off rank 0).
        device: override (default: ``cuda:LOCAL_RANK`` if CUDA is available, else CPU).
        on_step: ``on_step(step, stats)`` after every optimiser step, stats = rank-mean floats (tests, tools).
        stop_after_step: return right after this global step (and its checkpoint, if one is due): a clean stand-in
            for a kill in tests; no final outputs are written.
        progress: show a tqdm bar on rank 0.
    Returns:
        the metrics dict (also written to ``metrics_path``).
    """
    from components.slotcon.augment import TwoViewAugment
    from components.slotcon.model import SlotCon, model_kwargs_from_config

    if device is None:
        device = torch.device(f"cuda:{dist.get_local_rank()}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.get_local_rank())
    own_group = not dist.is_initialized() and dist.init_distributed(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(threads, cfg.num_workers))
    try:
        return _run(cfg, shards_root, out_dir, ckpt_dir, metrics_path, plots_dir, tracker, device, on_step,
                    stop_after_step, progress, SlotCon, model_kwargs_from_config, TwoViewAugment)
    finally:
        torch.set_num_threads(threads)
        if own_group:
            torch.distributed.destroy_process_group()


def cpu_threads(current: int, num_workers: int, cores: int | None = None) -> int:
    """Intra-op threads for CPU training: at most the cores left after one per loader worker (which decode JPEGs on
    CPU). Oversubscribed OpenMP threads spin at their barriers: on a busy 2-core box the demo took 162 s with 2
    threads and 35 s with 1; an idle box loses at most the second thread's share of the convolutions."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(current, cores - num_workers))


def _run(cfg, shards_root, out_dir, ckpt_dir, metrics_path, plots_dir, tracker, device, on_step, stop_after_step,
         progress, SlotCon, model_kwargs_from_config, TwoViewAugment) -> dict[str, Any]:
    from components.tracking import Tracker

    tracker = tracker or Tracker()
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest conv algorithms once
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside bf16 autocast
    plan = make_plan(cfg, shards_root, world, rank)
    decode = "bytes" if cuda else "rgb"

    # ---- model, optimiser (same init on every rank; DDP also broadcasts rank 0's) --------------------------------
    torch.manual_seed(cfg.seed)
    model_kwargs = model_kwargs_from_config(cfg)
    model = SlotCon(**model_kwargs).to(device)
    if cuda and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # NHWC convs: tensor cores without transposes
    optimizer = build_optimizer(model, name=cfg.optimizer, lr=plan.peak_lr, weight_decay=cfg.weight_decay)
    augment = TwoViewAugment(image_size=cfg.image_size).to(device)
    generator = _seed_generator(cfg.seed, rank)

    # ---- resume ---------------------------------------------------------------------------------------------------
    params = cfg.model_dump()
    fp_hash, fp = ckpt.fingerprint(params, {"world_size": world, "samples_per_epoch": plan.samples_per_epoch,
                                            "data": plan.data_signature})
    run_dir = Path(ckpt_dir) / fp_hash
    step, epoch, skip = 0, 0, 0
    history: list[dict[str, float]] = []
    epoch_sums = dict.fromkeys(STAT_KEYS, 0.0)
    resumed_from = None
    found = _find_resume_state(run_dir, is_main)
    if found is not None:
        path, state = found
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, skip = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        history = list(state.get("history", []))
        epoch_sums = dict(state.get("epoch_sums", epoch_sums))
        rank_states = state.get("rank_states") or []
        if len(rank_states) == world:
            ckpt.set_rng_state(rank_states[rank], generator)
        if state.get("num_workers") != cfg.num_workers and is_main:
            print(f"slotcon pretrain: num_workers {state.get('num_workers')} -> {cfg.num_workers}: resuming, but the "
                  "loader's sample order differs from an uninterrupted run", file=sys.stderr)
        resumed_from = str(path)
        if is_main:
            print(f"slotcon pretrain: resuming from {path} at step {step} (epoch {epoch + 1}, batch {skip})",
                  file=sys.stderr)
    elif is_main:
        others = ckpt.other_runs(ckpt_dir, fp_hash)
        why = (f"checkpoints in {ckpt_dir} belong to other configurations ({', '.join(others)}); params that change "
               "the run differ, so this run restarts cleanly (those checkpoints are left untouched)") if others else \
            f"no checkpoint in {run_dir}"
        print(f"slotcon pretrain: starting from scratch ({why})", file=sys.stderr)
    if skip >= plan.steps_per_epoch:  # saved exactly at an epoch end by an older cadence
        epoch, skip = epoch + 1, 0

    # ---- wrappers: SyncBN + DDP, compile ----------------------------------------------------------------------------
    runner = StepRunner(model, cfg, device, world)
    raw = runner.raw

    if is_main:
        tracker.log_params({"global_batch": plan.global_batch, "world_size": world, "steps_per_epoch":
                            plan.steps_per_epoch, "total_steps": plan.total_steps, "peak_lr": plan.peak_lr,
                            "num_images": plan.num_images, "fingerprint": fp_hash, "device": str(device),
                            "decode": decode}, prefix="pretrain.plan.")

    def save(step_now: int, epoch_now: int, batch_now: int) -> None:
        rank_states = _gather_objects(ckpt.rng_state(generator))
        if is_main:
            state = {
                "model": raw.state_dict(),
                "model_kwargs": model_kwargs,
                "arch": cfg.arch,
                "optimizer": optimizer.state_dict(),
                "step": step_now,
                "epoch": epoch_now,
                "batch_in_epoch": batch_now,
                "history": history,
                "epoch_sums": epoch_sums,
                "rank_states": rank_states,
                "world_size": world,
                "num_workers": cfg.num_workers,
                "config": params,
                "fingerprint": fp,
                "fingerprint_hash": fp_hash,
            }
            ckpt.save_checkpoint(state, run_dir, step_now)
        dist.barrier()

    # ---- train ------------------------------------------------------------------------------------------------------
    from tqdm import tqdm

    bar = tqdm(total=plan.total_steps, initial=min(step, plan.total_steps), disable=not (progress and is_main),
               desc="pretrain", unit="step", dynamic_ncols=True, mininterval=1.0)
    runner.model.train()
    t_start = time.perf_counter()
    t_window, steps_window, steps_run = time.perf_counter(), 0, 0
    last_stats: dict[str, float] = {}
    stopped = False
    while epoch < cfg.epochs and not stopped:
        batches = iter(build_loader(cfg, plan, epoch, decode))
        for i in range(plan.steps_per_epoch):
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(f"the loader of epoch {epoch} gave {i} batches, {plan.steps_per_epoch} expected "
                                   "(a loader contract bug: resampled loaders must not run dry)") from None
            if i < skip:
                continue  # resume: these batches were consumed before the checkpoint (same seed -> same stream)
            lr = lr_at(step, peak_lr=plan.peak_lr, min_lr=cfg.min_lr, warmup_steps=plan.warmup_steps,
                       total_steps=plan.total_steps)
            m = momentum_at(step, base_momentum=cfg.teacher_momentum, total_steps=plan.total_steps)
            views = make_views(batch, augment, generator, device)
            vec = runner(views, optimizer, lr, m)
            if vec[-1].item() > 0:
                where = checkpoint_hint(run_dir)
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (epoch {epoch + 1}, batch {i}) on {int(vec[-1].item())} of "
                    f"{world} rank(s); every rank stopped before the update; last good checkpoint: {where}. "
                    "Lower pretrain.base_lr or check the data, then re-run (it resumes from that checkpoint)")
            step += 1
            steps_run += 1
            steps_window += 1
            stats = {k: float(v) / world for k, v in zip(STAT_KEYS, vec[:-1].tolist())}
            for k in STAT_KEYS:
                epoch_sums[k] += stats[k]
            last_stats = stats
            if on_step is not None:
                on_step(step, dict(stats, lr=lr, momentum=m))
            bar.update(1)
            if is_main and (step % cfg.log_every_steps == 0 or step == plan.total_steps):
                elapsed = time.perf_counter() - t_window
                img_s = steps_window * plan.global_batch / max(elapsed, 1e-9)
                tracker.log_metrics({**stats, "lr": lr, "momentum": m, "img_per_s": img_s,
                                     "gpu_mem_gb": _gpu_mem_gb(device)}, step=step)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", slots=f"{stats['num_slots']:.1f}",
                                ent=f"{stats['assign_entropy']:.2f}", img_s=f"{img_s:.0f}")
                t_window, steps_window = time.perf_counter(), 0
            end_of_epoch = i + 1 == plan.steps_per_epoch
            if end_of_epoch:
                n = plan.steps_per_epoch
                history.append({"epoch": epoch + 1, **{k: epoch_sums[k] / n for k in STAT_KEYS}})
                epoch_sums = dict.fromkeys(STAT_KEYS, 0.0)
                if is_main:
                    tracker.log_metrics({f"epoch_{k}": v for k, v in history[-1].items() if k != "epoch"},
                                        step=step)
                save(step, epoch + 1, 0)
            elif step % cfg.save_every_steps == 0:
                save(step, epoch, i + 1)
            if stop_after_step is not None and step >= stop_after_step:
                stopped = True
                break
        skip = 0
        if not stopped:
            epoch += 1
    bar.close()
    train_time = time.perf_counter() - t_start
    if stopped:
        return {"stopped_at_step": step}

    # ---- records ----------------------------------------------------------------------------------------------------
    metrics: dict[str, Any] = {}
    if is_main:
        last = history[-1] if history else {}
        metrics = {
            **{k: last.get(k, last_stats.get(k, float("nan"))) for k in STAT_KEYS},
            "first_epoch_loss": history[0]["loss"] if history else float("nan"),
            "epochs": len(history),
            "steps": step,
            "steps_this_run": steps_run,
            "train_time_s": round(train_time, 3),
            "img_per_s": round(steps_run * plan.global_batch / train_time, 2) if steps_run and train_time else 0.0,
            "global_batch": plan.global_batch,
            "world_size": world,
            "peak_lr": plan.peak_lr,
            "gpu_mem_gb": round(_gpu_mem_gb(device), 3),
            "resumed": resumed_from is not None,
        }
        last_pt = Path(out_dir) / "last.pt"
        from components.io import save_torch_atomic

        save_torch_atomic({
            "model": raw.state_dict(),
            "model_kwargs": model_kwargs,
            "arch": cfg.arch,
            "epoch": len(history),
            "step": step,
            "history": history,
            "config": params,
            "fingerprint_hash": fp_hash,
            "metrics": metrics,
        }, last_pt)
        if plots_dir is not None:
            png = write_loss_plot(history, plots_dir)
            if png is not None:
                tracker.log_artifact(png, "plots")
        if metrics_path is not None:
            from components.io import write_json_atomic

            write_json_atomic(metrics_path, metrics)
        tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        print(f"slotcon pretrain: {step} steps, loss {metrics['loss']:.4f} (first epoch {metrics['first_epoch_loss']:.4f}),"
              f" {metrics['img_per_s']:.1f} img/s, {train_time:.1f} s -> {last_pt}", file=sys.stderr)
    dist.barrier()
    return metrics


def checkpoint_hint(run_dir: Path) -> str:
    found = ckpt.list_checkpoints(run_dir)
    return str(found[-1][1]) if found else "none yet (the run restarts from scratch)"


def write_loss_plot(history: list[dict[str, float]], plots_dir: str | os.PathLike) -> Path | None:
    """``loss.csv`` (epoch, loss, loss_group, loss_slot: DVC's plot) and ``loss.png``; returns the PNG path."""
    from components.io import write_text_atomic

    plots_dir = Path(plots_dir)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PLOT_COLUMNS)
    for row in history:
        writer.writerow([row["epoch"]] + [f"{row[k]:.6f}" for k in PLOT_COLUMNS[1:]])
    write_text_atomic(plots_dir / "loss.csv", buf.getvalue())
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    epochs = [r["epoch"] for r in history]
    for k in PLOT_COLUMNS[1:]:
        ax.plot(epochs, [r[k] for r in history], marker="o", ms=3, label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("SlotCon pretraining")
    ax.legend()
    fig.tight_layout()
    png = plots_dir / "loss.png"
    data = io.BytesIO()
    fig.savefig(data, format="png")
    plt.close(fig)
    from components.io import write_bytes_atomic

    write_bytes_atomic(png, data.getvalue())
    return png


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", default="data/shards", help="shard root with index.json")
    parser.add_argument("--out", default="models/pretrain", help="receives last.pt")
    parser.add_argument("--checkpoints", default="checkpoints/pretrain", help="resumable checkpoints (not a DVC out)")
    parser.add_argument("--metrics", default="metrics/pretrain.json")
    parser.add_argument("--plots", default="plots/pretrain", help="loss.csv + loss.png")


def _under_torchrun() -> bool:
    """True inside a torchrun worker (or any launcher that set WORLD_SIZE > 1): never launch again from there."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", 1)) > 1


def launch_command(args: argparse.Namespace, cfg) -> list[str]:
    """``python -m torch.distributed.run ... -m components pretrain <same args>`` for this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.nproc_per_node}"]
    if cfg.nnodes == 1:
        cmd.append("--standalone")
    else:
        addr = os.environ.get("MASTER_ADDR")
        if not addr or "NODE_RANK" not in os.environ:
            raise UserError(f"params: pretrain.nnodes={cfg.nnodes} needs MASTER_ADDR (node 0's address), "
                            "MASTER_PORT (default 29500) and NODE_RANK (0..nnodes-1) set on every node")
        cmd += [f"--nnodes={cfg.nnodes}", f"--node_rank={os.environ['NODE_RANK']}",
                f"--master_addr={addr}", f"--master_port={os.environ.get('MASTER_PORT', '29500')}"]
    cmd += ["-m", "components", "pretrain", "--params", args.params, "--shards", args.shards, "--out", args.out,
            "--checkpoints", args.checkpoints, "--metrics", args.metrics, "--plots", args.plots]
    return cmd


def main(args: argparse.Namespace) -> int:
    from components import tracking
    from components.config import load_section

    cfg = load_section("pretrain", args.params)
    tcfg = load_section("tracking", args.params)
    world = cfg.nproc_per_node * cfg.nnodes
    if world > 1 and not _under_torchrun():
        if torch.cuda.is_available() and cfg.nproc_per_node > torch.cuda.device_count():
            raise UserError(f"{args.params}: pretrain.nproc_per_node={cfg.nproc_per_node} but this node has "
                            f"{torch.cuda.device_count()} GPU(s)")
        tracking.ensure_experiment(tcfg)  # before the ranks start: concurrent SQLite migrations race
        cmd = launch_command(args, cfg)
        print("slotcon pretrain: launching " + " ".join(cmd), file=sys.stderr)
        return subprocess.call(cmd)
    with tracking.stage_run("pretrain", cfg, tcfg) as tracker:
        run_pretrain(cfg, args.shards, args.out, args.checkpoints, args.metrics, args.plots, tracker=tracker)
    return 0
