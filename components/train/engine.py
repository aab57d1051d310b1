"""The training engine: the one step loop under pretraining, detection and segmentation fine-tuning.

A method plugs in as a small object (:class:`Method`): it builds its model and optimiser, gives the learning rate of a
step, yields the batches of an epoch, moves a batch to the device, computes the losses of a step, and (optionally)
updates an EMA teacher after the optimiser step. The engine owns everything else, once:

- **the loop**: epochs of batches (a known number per epoch, or one pass of a loader of unknown length) up to
  ``total_steps``; tqdm progress on rank 0; throughput (images/s) per logging window;
- **schedules** as pure functions of the global step (the method's ``lr_at``/``momentum_at``), so resume is exact;
- **checkpoints**: atomic (temp + fsync + rename), in ``<ckpt_dir>/<fingerprint>/step_*.pt``, where the fingerprint
  hashes everything that changes what a step computes; a re-run resumes from the newest one of the same fingerprint:
  model, optimiser, method state, step, position in the epoch (the epoch's loader is rebuilt with the same seed and the
  consumed batches are skipped), per-rank RNG states (torch CPU/CUDA and the method's generators, restored at the first
  batch after the skipped ones, where the straight run had them), the per-epoch running sums;
- **the all-rank non-finite stop**: every step all-reduces one small vector (the stats plus a non-finite flag) on the
  device, without a host sync; the engine looks at it on the host only every ``log_every`` steps and before every
  checkpoint, so no checkpoint ever holds a state after a non-finite loss, every rank stops at the same step, and the
  error names the first bad step and the last good checkpoint;
- **logging**: MLflow metrics every ``log_every`` steps (rank 0), nothing on other steps;
- **processes**: the process group is the caller's (the stage runtime joins it); DDP wraps the model when the world
  is larger than one (SyncBatchNorm on CUDA when the method asks for it: torch has none on CPU), ``torch.compile``
  when asked, bf16 autocast on CUDA when asked.

:func:`fit` returns a :class:`FitResult` (history per epoch, the logged curve, steps, time, throughput); what a stage
writes from it (``last.pt``, metrics files, pictures) stays in the stage.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from components import dist
from components.errors import UserError
from components.train import checkpoint as ckpt


class NonFiniteLossError(UserError):
    """A non-finite loss on some rank: every rank raises it at the same step (the last good checkpoint is kept)."""


# --------------------------------------------------------------------------------------------------------------------
# what a method provides
# --------------------------------------------------------------------------------------------------------------------
class Method:
    """Base class of what the engine drives. Override what differs; the defaults suit a plain supervised model.

    Required: :meth:`build`, :meth:`optimizer`, :meth:`lr_at`, :meth:`batches`, :meth:`forward`.
    """

    #: names of the per-step figures :meth:`forward` returns (scalar tensors); the first is the loss to minimise
    stat_keys: tuple[str, ...] = ("loss",)
    #: convert BatchNorm to SyncBatchNorm under DDP on CUDA
    sync_bn: bool = True
    #: images per step over all ranks (throughput); set by the method
    global_batch: int = 1

    def build(self, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def lr_at(self, step: int) -> float:
        raise NotImplementedError

    def momentum_at(self, step: int) -> float | None:
        """EMA momentum of ``step`` (None: the method has no EMA)."""
        return None

    def batches(self, epoch: int) -> Iterable[Any]:
        """This rank's batches of ``epoch`` (deterministic from the seed and the epoch: resume re-reads them)."""
        raise NotImplementedError

    def prepare(self, batch: Any, device: torch.device) -> Any:
        """Loader batch -> what :meth:`forward` takes, on ``device`` (decode, augment, transfer)."""
        return batch

    def forward(self, model: nn.Module, batch: Any, step: int) -> Mapping[str, torch.Tensor]:
        """The losses of one step: ``{"loss": tensor with graph, <stat>: detached scalar, ...}``."""
        raise NotImplementedError

    def before_update(self, model: nn.Module, step: int) -> None:
        """After ``backward``, before ``optimizer.step`` (gradient clipping, cancelling a frozen part's grads)."""

    def after_update(self, model: nn.Module, step: int, momentum: float | None) -> None:
        """After ``optimizer.step`` (EMA teacher update). ``model`` is the unwrapped module."""

    def compile(self, model: nn.Module) -> None:
        """``torch.compile`` what pays (in place, so state_dict keys stay plain)."""
        model.compile()

    def generators(self) -> list[torch.Generator]:
        """Per-rank generators whose states go into checkpoints (e.g. the augmentation generator)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Extra method state for checkpoints (counters of skipped data, ...)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class RunSpec:
    """The run's shape and knobs (from a params section). ``steps_per_epoch=None``: an epoch is one loader pass."""

    total_steps: int
    steps_per_epoch: int | None = None
    log_every: int = 10
    save_every: int = 0  # 0: only at epoch ends and at the end
    amp: bool = True
    channels_last: bool = False
    compile: bool = False
    label: str = "train"  # progress bar and messages
    metric_prefix: str = ""  # MLflow metric names: f"{prefix}{stat}"
    keep_checkpoints: int = 2
    progress: bool = True


@dataclass
class FitResult:
    history: list[dict[str, float]]  # one row per finished epoch: {"epoch", <stat>: mean}
    curve: list[dict[str, float]]  # one row per logging window: {"step", <stat>: mean over the window, "lr"}
    step: int
    steps_this_run: int
    train_time_s: float
    img_per_s: float
    resumed_from: str | None
    last_stats: dict[str, float]
    stopped: bool = False  # stopped by ``stop_after_step`` (tests): no final outputs are written
    run_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------
def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group gets ``lr`` times its ``lr_scale`` (default 1): one schedule, per-group multipliers."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; fp32 elsewhere (CPU autocast is slower than fp32 for convs)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_device() -> torch.device:
    return torch.device("cuda", dist.get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def wrap_model(model: nn.Module, device: torch.device, *, sync_bn: bool) -> tuple[nn.Module, nn.Module]:
    """``(wrapped, raw)``: DDP (SyncBatchNorm first on CUDA when ``sync_bn``) when the world is larger than one."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return model, model
    cuda = device.type == "cuda"
    if cuda and sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                              broadcast_buffers=True)
    return ddp, model


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (one element without a group)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    if dist.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def find_resume_state(run_dir: Path) -> tuple[Path, dict] | None:
    """Rank 0 picks the newest checkpoint; every rank resumes from that same one (read from a shared filesystem, or
    sent by rank 0 when another node cannot see the file), so ranks can never start from different steps."""
    is_main = dist.get_rank() == 0
    found = ckpt.find_latest(run_dir) if is_main else None
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return found
    meta = [str(found[0]) if found else None]
    torch.distributed.broadcast_object_list(meta, src=0)
    if meta[0] is None:
        return None
    path = Path(meta[0])
    state = found[1] if is_main else (ckpt.load_checkpoint(path) if path.is_file() else None)
    if dist.any_rank(state is None, device=_collective_device()):  # node-local checkpoint dirs: rank 0 ships it
        box = [state if is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        state = box[0]
    return path, state


def checkpoint_hint(run_dir: Path | None) -> str:
    found = ckpt.list_checkpoints(run_dir) if run_dir is not None else []
    return str(found[-1][1]) if found else "none yet (the run restarts from scratch)"


def gpu_mem_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


# --------------------------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------------------------
class Trainer:
    """One optimisation step exactly as :func:`fit` runs it (benchmarks time this same code).

    Holds the method, the (maybe DDP-wrapped, compiled) model and the optimiser. :meth:`step` prepares a loader batch,
    runs forward under autocast, all-reduces ``[stats..., non-finite flag]`` (summed over ranks, left on the device:
    no host sync), then backward, the optimiser step and the method's EMA hook.
    """

    def __init__(self, method: Method, model: nn.Module, optimizer: torch.optim.Optimizer, spec: RunSpec,
                 device: torch.device):
        self.method, self.optimizer, self.spec, self.device = method, optimizer, spec, device
        self.keys = tuple(method.stat_keys)
        self.wrapped, self.raw = wrap_model(model, device, sync_bn=method.sync_bn)
        if spec.compile:
            method.compile(self.raw)
        self.channels_last = device.type == "cuda" and spec.channels_last

    def step(self, batch: Any, step: int) -> tuple[torch.Tensor, float, float | None]:
        """Train on ``batch`` as global step ``step``; returns ``(rank-summed stat vector, lr, momentum)``."""
        method, optimizer = self.method, self.optimizer
        lr = method.lr_at(step)
        momentum = method.momentum_at(step)
        set_lr(optimizer, lr)
        inputs = method.prepare(batch, self.device)
        if self.channels_last:
            inputs = _channels_last(inputs)
        with autocast(self.device, self.spec.amp):
            out = method.forward(self.wrapped, inputs, step)
        loss = out["loss"]
        vec = torch.stack([out[k].detach().float().reshape(()) for k in self.keys]
                          + [(~torch.isfinite(loss.detach())).float().reshape(())])
        vec = dist.all_reduce_sum(vec)  # one small collective per step, no host sync
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.before_update(self.raw, step)
        optimizer.step()
        method.after_update(self.raw, step, momentum)
        return vec, lr, momentum


class _Window:
    """Device-side running sums of the all-reduced stat vectors between two host looks (no per-step sync)."""

    def __init__(self, n: int, device: torch.device):
        self.sum = torch.zeros(n, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
        self.steps = 0

    def add(self, vec: torch.Tensor, step: int) -> None:
        self.sum += torch.nan_to_num(vec, nan=0.0, posinf=0.0, neginf=0.0)
        bad = vec[-1] > 0
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad)
        self.steps += 1

    def read(self) -> tuple[torch.Tensor, int]:
        """(sums on the CPU, first bad step or -1), then reset the sums (the bad-step marker stays)."""
        sums, bad = self.sum.to("cpu", copy=True), int(self.first_bad.item())
        self.sum.zero_()
        self.steps = 0
        return sums, bad


def fit(
    method: Method,
    spec: RunSpec,
    *,
    ckpt_dir: str | Path | None,
    fingerprint: Mapping[str, Any],
    tracker=None,
    device: torch.device | None = None,
    on_step=None,
    stop_after_step: int | None = None,
) -> FitResult:
    """Train ``method`` for ``spec.total_steps`` steps (resuming from ``ckpt_dir`` when a checkpoint of the same
    ``fingerprint`` exists); see the module docstring.

    ``on_step(step, stats)`` is called after every step with the rank-mean stats as floats (tests and tools: it forces
    a host sync per step). ``stop_after_step`` returns right after that global step (and its checkpoint, if one is
    due): a clean stand-in for a kill in tests.
    """
    from components.tracking import Tracker

    tracker = tracker or Tracker()
    device = torch.device(device) if device is not None else default_device()
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    keys = tuple(method.stat_keys)

    model = method.build(device)
    optimizer = method.optimizer(model)
    fp_hash, fp = ckpt.fingerprint(dict(fingerprint), {"world_size": world})
    run_dir = Path(ckpt_dir) / fp_hash if ckpt_dir is not None else None

    # ---- resume --------------------------------------------------------------------------------------------------
    step, epoch, skip = 0, 0, 0
    history: list[dict[str, float]] = []
    curve: list[dict[str, float]] = []
    epoch_sums = torch.zeros(len(keys))
    epoch_steps = 0
    resumed_from = None
    pending_rng = None
    found = find_resume_state(run_dir) if run_dir is not None else None
    if found is not None:
        path, state = found
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state.get("method", {}))
        step, epoch, skip = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        history, curve = list(state.get("history", [])), list(state.get("curve", []))
        epoch_sums = torch.as_tensor(state.get("epoch_sums", epoch_sums), dtype=torch.float32)
        epoch_steps = int(state.get("epoch_steps", 0))
        rank_states = state.get("rank_states") or []
        pending_rng = rank_states[rank] if len(rank_states) == world else None
        resumed_from = str(path)
        if is_main:
            print(f"{spec.label}: resuming from {path} at step {step} (epoch {epoch + 1}, batch {skip})",
                  file=sys.stderr, flush=True)
    elif is_main and run_dir is not None:
        others = ckpt.other_runs(ckpt_dir, fp_hash)
        why = (f"checkpoints in {ckpt_dir} belong to other configurations ({', '.join(others)}); params that change "
               "the run differ, so this run restarts cleanly (those checkpoints are left untouched)") if others else \
            f"no checkpoint in {run_dir}"
        print(f"{spec.label}: starting from scratch ({why})", file=sys.stderr, flush=True)
    if run_dir is not None and is_main:
        ckpt.remove_stale_temporaries(run_dir)
    if spec.steps_per_epoch and skip >= spec.steps_per_epoch:  # saved exactly at an epoch end
        epoch, skip = epoch + 1, 0

    trainer = Trainer(method, model, optimizer, spec, device)
    raw = trainer.raw

    def save(step_now: int, epoch_now: int, batch_now: int) -> None:
        rank_states = gather_objects(ckpt.rng_state(method.generators()))
        if is_main and run_dir is not None:
            ckpt.save_checkpoint({
                "model": raw.state_dict(), "optimizer": optimizer.state_dict(), "method": method.state_dict(),
                "step": step_now, "epoch": epoch_now, "batch_in_epoch": batch_now, "history": history,
                "curve": curve, "epoch_sums": epoch_sums.tolist(), "epoch_steps": epoch_steps,
                "rank_states": rank_states, "world_size": world, "fingerprint": fp, "fingerprint_hash": fp_hash,
            }, run_dir, step_now, keep=spec.keep_checkpoints)
        dist.barrier()

    # ---- train ---------------------------------------------------------------------------------------------------
    from tqdm import tqdm

    bar = tqdm(total=spec.total_steps, initial=min(step, spec.total_steps), desc=spec.label, unit="step",
               disable=not (spec.progress and is_main), dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    trainer.wrapped.train()
    window = _Window(len(keys) + 1, device)
    t_start = t_window = time.perf_counter()
    steps_run, steps_window = 0, 0
    last_stats: dict[str, float] = {}
    stopped = False
    lr = 0.0

    def look(at_step: int) -> dict[str, float] | None:
        """Host look at the window: raise on a non-finite loss; else fold the window into the epoch sums, append a
        curve row, log it, and return the window's rank-mean stats (None if no step ran since the last look)."""
        nonlocal last_stats, epoch_sums, epoch_steps, t_window, steps_window
        n = window.steps
        sums, bad = window.read()
        if bad >= 0:
            raise NonFiniteLossError(
                f"{spec.label}: non-finite loss at step {bad} on {world} rank(s) (seen at step {at_step}); every "
                f"rank stopped, no checkpoint holds a later state; last good checkpoint: {checkpoint_hint(run_dir)}. "
                "Lower the learning rate or check the data, then re-run (it resumes from that checkpoint)")
        if n == 0:
            return None
        last_stats = {k: float(v) / (world * n) for k, v in zip(keys, sums[:-1].tolist())}
        epoch_sums += torch.tensor([last_stats[k] * n for k in keys])
        epoch_steps += n
        elapsed = time.perf_counter() - t_window
        img_s = steps_window * method.global_batch / max(elapsed, 1e-9)
        t_window, steps_window = time.perf_counter(), 0
        row = {"step": at_step, **last_stats, "lr": lr}
        if momentum is not None:
            row["momentum"] = momentum
        curve.append(row)
        if is_main:
            p = spec.metric_prefix
            tracker.log_metrics({**{f"{p}{k}": v for k, v in row.items() if k != "step"},
                                 f"{p}img_per_s": img_s, f"{p}gpu_mem_gb": gpu_mem_gb(device)}, step=at_step)
            bar.set_postfix(loss=f"{last_stats[keys[0]]:.3f}", lr=f"{lr:.2g}", img_s=f"{img_s:.0f}")
        return last_stats

    def close_epoch(number: int) -> None:
        nonlocal epoch_sums, epoch_steps
        history.append({"epoch": number, **{k: float(v) / max(epoch_steps, 1)
                                            for k, v in zip(keys, epoch_sums.tolist())}})
        if is_main:
            tracker.log_metrics({f"{spec.metric_prefix}epoch_{k}": v for k, v in history[-1].items() if k != "epoch"},
                                step=step)
        epoch_sums, epoch_steps = torch.zeros(len(keys)), 0

    momentum = None
    while step < spec.total_steps and not stopped:
        it: Iterator = iter(method.batches(epoch))
        i = 0
        for _ in range(skip):  # resume: the batches consumed before the checkpoint (same seed -> same stream)
            if next(it, None) is None:
                break
            i += 1
        if pending_rng is not None:  # where the straight run was when it fetched this batch
            ckpt.set_rng_state(pending_rng, method.generators())
            pending_rng = None
        skip = 0
        for batch in it:
            vec, lr, momentum = trainer.step(batch, step)
            window.add(vec, step)
            step += 1
            i += 1
            steps_run += 1
            steps_window += 1
            bar.update(1)
            end_of_epoch = spec.steps_per_epoch is not None and i >= spec.steps_per_epoch
            due_save = end_of_epoch or step == spec.total_steps or bool(spec.save_every and step % spec.save_every == 0)
            if on_step is not None or step % spec.log_every == 0 or due_save or stop_after_step == step:
                stats = look(step)  # raises on a non-finite loss: nothing below runs, no checkpoint is written
                if on_step is not None and stats is not None:
                    on_step(step, dict(stats, lr=lr, **({"momentum": momentum} if momentum is not None else {})))
            if end_of_epoch:
                close_epoch(epoch + 1)
                save(step, epoch + 1, 0)
            elif due_save:
                save(step, epoch, i)
            if stop_after_step is not None and step >= stop_after_step:
                stopped = True
                break
            if end_of_epoch or step >= spec.total_steps:
                break
        else:  # the loader ran dry
            if spec.steps_per_epoch is not None:
                raise RuntimeError(f"{spec.label}: the loader of epoch {epoch} gave {i} batches, "
                                   f"{spec.steps_per_epoch} expected (resampled loaders must not run dry)")
            if i == 0:
                raise UserError(f"{spec.label}: epoch {epoch} yielded no batch on rank {rank}; check the data "
                                "(slotcon shard --verify) and the batch size")
            look(step)
            i = -1  # marks a finished pass
        if stopped:
            break
        if epoch_steps and (i == -1 or step >= spec.total_steps):  # a pass ended, or the run ended inside one
            close_epoch(epoch + 1)
        if i == -1 or (spec.steps_per_epoch is not None and i >= spec.steps_per_epoch):
            epoch += 1
    bar.close()
    train_time = time.perf_counter() - t_start
    return FitResult(
        history=history, curve=curve, step=step, steps_this_run=steps_run, train_time_s=train_time,
        img_per_s=steps_run * method.global_batch / train_time if steps_run and train_time > 0 else 0.0,
        resumed_from=resumed_from, last_stats=last_stats, stopped=stopped, run_dir=run_dir,
        extra={"model": raw, "optimizer": optimizer, "fingerprint_hash": fp_hash, "device": device},
    )


def _channels_last(inputs: Any) -> Any:
    """4-D float tensors of a batch dict to channels_last (NHWC convs: tensor cores without transposes)."""
    if isinstance(inputs, dict):
        return {k: (v.contiguous(memory_format=torch.channels_last)
                    if isinstance(v, torch.Tensor) and v.ndim == 4 and v.is_floating_point() else v)
                for k, v in inputs.items()}
    return inputs


# --------------------------------------------------------------------------------------------------------------------
# loss curves: CSV (DVC plot) + PNG
# --------------------------------------------------------------------------------------------------------------------
def write_loss_plot(rows: Sequence[Mapping[str, float]], csv_path: str | Path, png_path: str | Path | None, *,
                    x: str, ys: Sequence[str], title: str, xlabel: str | None = None) -> None:
    """``csv_path`` (columns ``x, *ys``) and ``png_path`` (one line per column), written atomically. An empty run
    still rewrites both (an empty chart), so a picture never shows another run's curves."""
    from components.io import write_bytes_atomic, write_text_atomic

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([x, *ys])
    for row in rows:
        writer.writerow([row.get(x, "")] + [_fmt(row.get(k)) for k in ys])
    write_text_atomic(csv_path, buf.getvalue())
    if png_path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for k in ys:
        pts = [(r[x], r[k]) for r in rows if r.get(k) is not None and math.isfinite(float(r[k]))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 40 else None, ms=3, label=k)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel("loss")
    ax.set_title(title)
    if rows:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no steps run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    data = io.BytesIO()
    fig.savefig(data, format="png")
    plt.close(fig)
    write_bytes_atomic(png_path, data.getvalue())


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{float(v):.6g}"
