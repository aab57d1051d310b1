"""The training engine: the one step loop (:func:`fit`) under pretraining, detection and segmentation fine-tuning.

A method plugs in as a :class:`~components.engine.method.Method`; the loop owns the rest once: epochs and schedules
by global step, atomic checkpoints with exact resume, the all-rank non-finite stop, logging, DDP / compile / autocast.
One step is in :mod:`components.engine.trainer`, the loss plot in :mod:`components.engine.plots`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from tqdm import tqdm

from components import dist
from components.errors import UserError
from components.tracking import Tracker
from components.engine import checkpoint as ckpt
from components.engine.method import Method
from components.engine.plots import write_loss_plot  # noqa: F401  (re-exported: stages write their curves with it)
from components.engine.trainer import (  # noqa: F401  (re-exported for methods, stages and benchmarks)
    Prefetcher,
    Trainer,
    autocast,
    default_device,
    gather_objects,
    set_lr,
    wrap_model,
)


class NonFiniteLossError(UserError):
    """A non-finite loss on some rank: every rank raises it at the same step (the last good checkpoint is kept)."""


class PeerLostError(UserError):
    """Another rank died or stopped answering (``SLOTCON_DDP_TIMEOUT_S``) mid-run: the surviving ranks stop with one
    line naming it, the step and the last checkpoint (a re-run of the same command on every node resumes there)."""


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
    prefetch: bool | None = None  # prepare the next batch during a step (None: on CUDA when the method asks)


@dataclass
class FitResult:
    history: list[dict[str, float]]  # one row per finished epoch: {"epoch", <stat>: mean}
    curve: list[dict[str, float]]  # one row per logging window: {"step", <stat>: mean over the window, "lr"}
    step: int
    steps_this_run: int
    train_time_s: float  # training time of the whole run: every resumed segment's (stored in the checkpoints)
    img_per_s: float  # throughput of this segment

    resumed_from: str | None
    last_stats: dict[str, float]
    stopped: bool = False  # stopped by ``stop_after_step`` (tests): no final outputs are written
    run_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    segment_time_s: float = 0.0  # training time of this call only (per-step timings: divide by steps_this_run)


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------
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
    ``fingerprint`` exists).

    - **the loop**: epochs of batches (a known number per epoch, or one pass of a loader of unknown length) up to
      ``total_steps``; tqdm progress on rank 0; throughput (images/s) per logging window;
    - **schedules** as pure functions of the global step (the method's ``lr_at``/``momentum_at``), so resume is exact;
    - **checkpoints**: atomic (temp + fsync + rename), in ``<ckpt_dir>/<fingerprint>/step_*.pt``, where the
      fingerprint hashes everything that changes what a step computes; a re-run resumes from the newest one of the
      same fingerprint: model, optimiser, method state, step, position in the epoch (the epoch's loader is rebuilt
      with the same seed and the consumed batches are skipped), per-rank RNG states (torch CPU/CUDA and the method's
      generators, restored at the first batch after the skipped ones, where the straight run had them), the
      per-epoch running sums;
    - **the all-rank non-finite stop**: every step all-reduces one small vector (the stats plus a non-finite flag) on
      the device, without a host sync; the engine looks at it on the host only every ``log_every`` steps and before
      every checkpoint, so no checkpoint ever holds a state after a non-finite loss, every rank stops at the same
      step, and the error names the first bad step and the last good checkpoint;
    - **logging**: MLflow metrics every ``log_every`` steps (rank 0), nothing on other steps;
    - **processes**: the process group is the caller's (the stage runtime joins it); DDP wraps the model when the
      world is larger than one (SyncBatchNorm on CUDA when the method asks for it: torch has none on CPU),
      ``torch.compile`` when asked, bf16 autocast on CUDA when asked.

    Returns a :class:`FitResult` (history per epoch, the logged curve, steps, time, throughput); what a stage writes
    from it (``last.pt``, metrics files, pictures) stays in the stage.

    ``on_step(step, stats)`` is called after every step with the rank-mean stats as floats (tests and tools: it forces
    a host sync per step). ``stop_after_step`` returns right after that global step (and its checkpoint, if one is
    due): a clean stand-in for a kill in tests.
    """
    loop = _Loop(method, spec, ckpt_dir=ckpt_dir, fingerprint=fingerprint, tracker=tracker, device=device,
                 on_step=on_step, stop_after_step=stop_after_step)
    try:
        loop.resume()
        return loop.run()
    except RuntimeError as exc:  # gloo / NCCL: a peer closed its connection or timed out
        reason = dist.peer_lost(exc)
        if reason is None:
            raise
        raise PeerLostError(f"{spec.label}: " + dist.lost_peer_message(
            reason, step=loop.step + 1, checkpoint=loop.checkpoint_text())) from exc
    finally:
        if hasattr(loop, "bar"):
            loop.bar.close()  # the error line starts on a line of its own


class _Loop:
    """The state of one :func:`fit` call: position, records, the device-side window, and what to do at each step."""

    def __init__(self, method: Method, spec: RunSpec, *, ckpt_dir, fingerprint, tracker, device, on_step,
                 stop_after_step):
        self.method, self.spec, self.on_step, self.stop_after_step = method, spec, on_step, stop_after_step
        self.tracker = tracker or Tracker()
        self.device = torch.device(device) if device is not None else default_device()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.keys = tuple(method.stat_keys)
        self.model = method.build(self.device)
        self.optimizer = method.optimizer(self.model)
        self.fp_hash, self.fp = ckpt.fingerprint(dict(fingerprint), {
            "world_size": self.world, "code": ckpt.code_digest(type(method).__module__)})
        self.ckpt_dir = ckpt_dir
        self.run_dir = Path(ckpt_dir) / self.fp_hash if ckpt_dir is not None else None
        # position and records (all restored by a resume)
        self.step = self.epoch = self.skip = 0
        self.history: list[dict[str, float]] = []
        self.curve: list[dict[str, float]] = []
        self.epoch_sums = torch.zeros(len(self.keys))
        self.epoch_steps = 0
        self.resumed_from: str | None = None
        self.saved_step: int | None = None  # the step of the newest checkpoint this run wrote or resumed from
        self.pending_rng = None
        self.time_before = 0.0  # training seconds of the segments before this one (from the checkpoint)
        self.t_start: float | None = None
        # this run
        self.steps_run = self.steps_window = 0
        self.last_stats: dict[str, float] = {}
        self.lr, self.momentum = 0.0, None
        self.prefetcher: Prefetcher | None = None

    # ---- resume and checkpoints ---------------------------------------------------------------------------------
    def resume(self) -> None:
        spec = self.spec
        found = find_resume_state(self.run_dir) if self.run_dir is not None else None
        if found is not None:
            path, state = found
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.method.load_state_dict(state.get("method", {}))
            self.step, self.epoch, self.skip = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
            self.history, self.curve = list(state.get("history", [])), list(state.get("curve", []))
            self.epoch_sums = torch.as_tensor(state.get("epoch_sums", self.epoch_sums), dtype=torch.float32)
            self.epoch_steps = int(state.get("epoch_steps", 0))
            self.time_before = float(state.get("train_time_s", 0.0))
            rank_states = state.get("rank_states") or []
            self.pending_rng = rank_states[self.rank] if len(rank_states) == self.world else None
            self.resumed_from, self.saved_step = str(path), self.step
            if self.is_main:
                print(f"{spec.label}: resuming from {path} at step {self.step} (epoch {self.epoch + 1}, batch "
                      f"{self.skip})", file=sys.stderr, flush=True)
        elif self.is_main and self.run_dir is not None:
            others = ckpt.other_runs(self.ckpt_dir, self.fp_hash)
            why = (f"checkpoints in {self.ckpt_dir} belong to other configurations ({', '.join(others)}); params "
                   "that change the run differ, so this run restarts cleanly (those checkpoints are left untouched)"
                   ) if others else f"no checkpoint in {self.run_dir}"
            print(f"{spec.label}: starting from scratch ({why})", file=sys.stderr, flush=True)
        if self.run_dir is not None and self.is_main:
            ckpt.remove_stale_temporaries(self.run_dir)
        if spec.steps_per_epoch and self.skip >= spec.steps_per_epoch:  # saved exactly at an epoch end
            self.epoch, self.skip = self.epoch + 1, 0

    def save(self, epoch_now: int, batch_now: int) -> None:
        state = ckpt.rng_state(self.method.generators())
        pre = self.prefetcher
        if pre is not None and pre.saved_generator_states is not None:  # from before the prefetch's draws
            state["generators"] = pre.saved_generator_states
            state["generator"] = state["generators"][0]
        rank_states = gather_objects(state)
        if self.is_main and self.run_dir is not None:
            ckpt.save_checkpoint({
                "model": self.trainer.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                "method": self.method.state_dict(), "step": self.step, "epoch": epoch_now,
                "batch_in_epoch": batch_now, "history": self.history, "curve": self.curve,
                "epoch_sums": self.epoch_sums.tolist(), "epoch_steps": self.epoch_steps, "rank_states": rank_states,
                "world_size": self.world, "fingerprint": self.fp, "fingerprint_hash": self.fp_hash,
                "train_time_s": self.train_time(),
            }, self.run_dir, self.step, keep=self.spec.keep_checkpoints)
        dist.barrier()
        self.saved_step = self.step

    def checkpoint_text(self) -> str:
        """The newest checkpoint for a message: its step (and its path where this rank sees the file)."""
        if self.saved_step is None:
            return "none yet: the re-run starts from scratch"
        path = ckpt.checkpoint_path(self.run_dir, self.saved_step) if self.run_dir is not None else None
        return f"step {self.saved_step}" + (f", {path}" if path is not None and path.is_file() else "")

    def train_time(self) -> float:
        """Training seconds so far over every segment of the run (this one's since :meth:`run` began)."""
        return self.time_before + (time.perf_counter() - self.t_start if self.t_start is not None else 0.0)

    # ---- host looks ---------------------------------------------------------------------------------------------
    def look(self) -> dict[str, float] | None:
        """Host look at the window: raise on a non-finite loss; else fold the window into the epoch sums, append a
        curve row, log it, and return the window's rank-mean stats (None if no step ran since the last look)."""
        spec, n = self.spec, self.window.steps
        sums, bad = self.window.read()
        if bad >= 0:
            raise NonFiniteLossError(
                f"{spec.label}: non-finite loss at step {bad} on {self.world} rank(s) (seen at step {self.step}); "
                "every rank stopped, no checkpoint holds a later state; last good checkpoint: "
                f"{checkpoint_hint(self.run_dir)}. Lower the learning rate or check the data, then re-run (it "
                "resumes from that checkpoint)")
        if n == 0:
            return None
        stats = {k: float(v) / (self.world * n) for k, v in zip(self.keys, sums[:-1].tolist())}
        self.last_stats = stats
        self.epoch_sums += torch.tensor([stats[k] * n for k in self.keys])
        self.epoch_steps += n
        now = time.perf_counter()
        img_s = self.steps_window * self.method.global_batch / max(now - self.t_window, 1e-9)
        self.t_window, self.steps_window = now, 0
        row = {"step": self.step, **stats, "lr": self.lr}
        if self.momentum is not None:
            row["momentum"] = self.momentum
        self.curve.append(row)
        if self.is_main:
            p = spec.metric_prefix
            self.tracker.log_metrics({**{f"{p}{k}": v for k, v in row.items() if k != "step"},
                                      f"{p}img_per_s": img_s, f"{p}gpu_mem_gb": gpu_mem_gb(self.device)},
                                     step=self.step)
            self.bar.set_postfix(loss=f"{stats[self.keys[0]]:.3f}", lr=f"{self.lr:.2g}", img_s=f"{img_s:.0f}")
        if self.on_step is not None:
            extra = {"momentum": self.momentum} if self.momentum is not None else {}
            self.on_step(self.step, dict(stats, lr=self.lr, **extra))
        return stats

    def close_epoch(self, number: int) -> None:
        n = max(self.epoch_steps, 1)
        self.history.append({"epoch": number, **{k: float(v) / n for k, v in zip(self.keys, self.epoch_sums.tolist())}})
        if self.is_main:
            self.tracker.log_metrics({f"{self.spec.metric_prefix}epoch_{k}": v for k, v in self.history[-1].items()
                                      if k != "epoch"}, step=self.step)
        self.epoch_sums, self.epoch_steps = torch.zeros(len(self.keys)), 0

    # ---- the loop -----------------------------------------------------------------------------------------------
    def _epoch_iterator(self) -> tuple[Iterator, int]:
        """This epoch's batches, past the ones a resumed run already consumed; RNG states restored right there."""
        it: Iterator = iter(self.method.batches(self.epoch))
        i = 0
        for _ in range(self.skip):  # same seed -> same stream: skip what the checkpointed run trained on
            if next(it, None) is None:
                break
            i += 1
        if self.pending_rng is not None:  # where the straight run was when it fetched the next batch
            ckpt.set_rng_state(self.pending_rng, self.method.generators())
            self.pending_rng = None
        self.skip = 0
        return it, i

    def run_epoch(self) -> tuple[int, bool]:
        """One epoch (or the rest of it); returns ``(batches consumed, -1 if the loader ran dry; stopped)``."""
        spec = self.spec
        it, i = self._epoch_iterator()
        self.prefetcher = Prefetcher(self.trainer, it) if self.prefetch else None
        for batch in (self.prefetcher if self.prefetcher is not None else it):
            if self.prefetcher is not None:
                vec, self.lr, self.momentum = self.trainer.step(None, self.step, prepared=batch)
            else:
                vec, self.lr, self.momentum = self.trainer.step(batch, self.step)
            self.window.add(vec, self.step)
            self.step += 1
            i += 1
            self.steps_run += 1
            self.steps_window += 1
            self.bar.update(1)
            end_of_epoch = spec.steps_per_epoch is not None and i >= spec.steps_per_epoch
            due_save = (end_of_epoch or self.step == spec.total_steps
                        or bool(spec.save_every and self.step % spec.save_every == 0))
            stop = self.stop_after_step is not None and self.step >= self.stop_after_step
            if self.on_step is not None or self.step % spec.log_every == 0 or due_save or stop:
                self.look()  # raises on a non-finite loss: nothing below runs, no checkpoint is written
            if end_of_epoch:
                self.close_epoch(self.epoch + 1)
                self.save(self.epoch + 1, 0)
            elif due_save:
                self.save(self.epoch, i)
            if stop:
                return i, True
            if end_of_epoch or self.step >= spec.total_steps:
                return i, False
        if spec.steps_per_epoch is not None:
            raise RuntimeError(f"{spec.label}: the loader of epoch {self.epoch} gave {i} batches, "
                               f"{spec.steps_per_epoch} expected (resampled loaders must not run dry)")
        if i == 0:
            raise UserError(f"{spec.label}: epoch {self.epoch} yielded no batch on rank {self.rank}; check the data "
                            "(slotcon shard --verify) and the batch size")
        self.look()
        return -1, False

    def run(self) -> FitResult:
        spec = self.spec
        self.trainer = Trainer(self.method, self.model, self.optimizer, spec, self.device)
        self.prefetch = spec.prefetch if spec.prefetch is not None else (
            self.device.type == "cuda" and self.method.prefetch)
        self.bar = tqdm(total=spec.total_steps, initial=min(self.step, spec.total_steps), desc=spec.label,
                        unit="step", disable=not (spec.progress and self.is_main), dynamic_ncols=True,
                        mininterval=1.0, file=sys.stderr)
        self.trainer.wrapped.train()
        self.window = _Window(len(self.keys) + 1, self.device)
        t_start = self.t_start = self.t_window = time.perf_counter()
        stopped = False
        while self.step < spec.total_steps:
            i, stopped = self.run_epoch()
            if stopped:
                break
            if self.epoch_steps and (i == -1 or self.step >= spec.total_steps):  # a pass ended, or the run did
                self.close_epoch(self.epoch + 1)
            if i == -1 or (spec.steps_per_epoch is not None and i >= spec.steps_per_epoch):
                self.epoch += 1
        self.bar.close()
        train_time = time.perf_counter() - t_start
        return FitResult(
            history=self.history, curve=self.curve, step=self.step, steps_this_run=self.steps_run,
            train_time_s=self.time_before + train_time, segment_time_s=train_time,
            img_per_s=self.steps_run * self.method.global_batch / train_time if self.steps_run and train_time > 0
            else 0.0,
            resumed_from=self.resumed_from, last_stats=self.last_stats, stopped=stopped, run_dir=self.run_dir,
            extra={"model": self.trainer.raw, "optimizer": self.optimizer, "fingerprint_hash": self.fp_hash,
                   "device": self.device},
        )
