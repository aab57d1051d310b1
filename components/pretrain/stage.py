"""``slotcon pretrain``: self-supervised pretraining from WebDataset shards on one CPU, one GPU, or GPUs over nodes.

``pretrain.method`` picks the method (:data:`components.pretrain.registry.METHODS`); the plan
(:mod:`components.pretrain.plan`) and the engine's loop (:func:`components.engine.loop.fit`) are shared. Outputs:
``models/pretrain/last.pt`` (:class:`components.pretrain.artifact.PretrainArtifact`), the metrics,
``plots/pretrain/loss.{csv,png}``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from components import dist
from components.data.shards.index import shards_root
from components.engine.loop import RunSpec, fit, gpu_mem_gb, write_loss_plot
from components.io import write_json_atomic
from components.pretrain.artifact import PretrainArtifact
from components.pretrain.method import PretrainMethod
from components.pretrain.registry import METHODS, method_class
from components.pretrain.plan import Plan, make_plan
from components.stage import Arg, Stage
from components.tracking import Tracker


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

    Joins the caller's process group or starts its own (the stage runtime, :mod:`components.stage`, launches torchrun
    itself when ``nproc_per_node * nnodes > 1``).

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
    PretrainArtifact(
        model=raw.state_dict(), model_kwargs=method.model_kwargs(), method=cfg.method, arch=cfg.arch,
        backbone_prefix=method.backbone_prefix, epoch=len(history), step=result.step, history=history,
        config=cfg.model_dump(), fingerprint_hash=result.extra["fingerprint_hash"], metrics=metrics,
    ).save(last_pt)
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
    return run_pretrain(ctx.cfg, shards_root(a.shards, a.params), a.out, a.checkpoints, None, a.plots, tracker=ctx.tracker)


STAGE = Stage(
    name="pretrain", section="pretrain", run=_run_stage, metrics="metrics/pretrain.json", distributed=True,
    headline=("loss", "train_time_s"),
    args=(Arg("shards", "data/shards", "shard root with index.json"),
          Arg("out", "models/pretrain", "receives last.pt"),
          Arg("checkpoints", "checkpoints/pretrain", "resumable checkpoints (not a DVC out)"),
          Arg("plots", "plots/pretrain", "loss.csv + loss.png")),
)
