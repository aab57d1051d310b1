"""What ``prepare`` and ``shard`` share to run long jobs safely: one writer per output folder, worker processes that
die with their parent, bounded parallel maps, progress with throughput, and the glue of their stage declarations.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

from components.errors import UserError
from components.stage import Arg

_HELD_FDS: set[int] = set()  # lock descriptors of this process: closed in forked workers (see _init_worker)


def work_dir(out_dir: str | os.PathLike) -> Path:
    """``data/shards`` -> ``data/.shards.work.tmp``: beside the output, not in it, so DVC (which deletes a stage's
    outputs before running it) leaves finished partial work for the next run to resume."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.work.tmp"


@contextlib.contextmanager
def hold_output(out_dir: str | os.PathLike, what: str) -> Iterator[Path]:
    """Exclusive right to write ``out_dir`` (and its work folder, yielded) for this process, or a one-line UserError.

    The right is an exclusive ``flock`` on ``<parent>/.<name>.work.tmp/LOCK`` (the work folder that also holds
    resumable partial results): a second writer stops at once, naming the holder's PID; the kernel drops the lock when
    its holder dies (even by SIGKILL), so a crash never leaves a stale lock.
    """
    out = Path(out_dir)
    work = work_dir(out)
    while True:
        work.mkdir(parents=True, exist_ok=True)
        path = work / "LOCK"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            pid = holder.split()[0] if holder.split() and holder.split()[0].isdigit() else "?"
            raise UserError(f"{out}: held by PID {pid} ({holder.partition(' ')[2] or what}); wait for it to finish, or "
                            f"stop it (kill {pid}) and re-run: finished work is kept") from None
        try:  # the previous holder may have removed the folder between our open and our lock: lock the new file
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {what} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _HELD_FDS.add(fd)
    try:
        yield work
    finally:
        _HELD_FDS.discard(fd)
        os.close(fd)


# --------------------------------------------------------------------------------------------------------------------
# worker processes
# --------------------------------------------------------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us when the parent thread exits
    except Exception:  # not Linux: the watchdog below does it within a second
        pass

    def watchdog() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(1.0)

    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=watchdog, daemon=True, name="parent-watchdog").start()


def _init_worker(parent_pid: int, lock_fds: tuple[int, ...]) -> None:
    for fd in lock_fds:  # the lock belongs to the parent alone: an orphan must never keep it held
        with contextlib.suppress(OSError):
            os.close(fd)
    _die_with_parent(parent_pid)


PRELOAD = ("pyarrow.parquet", "PIL.Image", "PIL.ImageOps")  # imported once here, inherited by the forked workers


@contextlib.contextmanager
def worker_pool(workers: int, preload: tuple[str, ...] = PRELOAD, grace_s: float = 30.0,
                ) -> Iterator[ProcessPoolExecutor | None]:
    """``workers`` fork-started processes (None for ``workers <= 1``: the caller runs inline) that ask the kernel for
    SIGKILL when their parent dies (``PR_SET_PDEATHSIG``; a watchdog thread checks ``getppid`` where that is missing).

    When the parent leaves by an exception (a worker's error re-raised, Ctrl-C), queued tasks are dropped and the
    running ones may finish for ``grace_s`` seconds (a finished shard is kept for the next run, a half one cleans its
    temporary file); workers still busy after that are killed. A killed parent takes its workers along (PDEATHSIG).
    """
    if workers <= 1:
        yield None
        return
    for name in preload:  # each worker would otherwise import them itself (seconds on a busy machine)
        importlib.import_module(name)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_init_worker, initargs=(os.getpid(), tuple(_HELD_FDS)))
    try:
        yield pool
    except BaseException:
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace_s
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        raise
    else:
        pool.shutdown(wait=True)


def run_bounded(pool: ProcessPoolExecutor | None, fn: Callable[[Any], Any], tasks: Iterable[Any],
                in_flight: int) -> Iterator[Any]:
    """``fn(task)`` for every task, at most ``in_flight`` submitted at a time; results as they complete (inline and
    in order when ``pool`` is None). A task's exception is re-raised here."""
    if pool is None:
        for t in tasks:
            yield fn(t)
        return
    pending: set[Future] = set()
    for t in tasks:
        pending.add(pool.submit(fn, t))
        while len(pending) >= in_flight:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                yield f.result()
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for f in done:
            yield f.result()


# --------------------------------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------------------------------
class Meter:
    """Items and bytes done against a (possibly unknown) total: a tqdm bar on a terminal, else (in DVC or Prefect logs)
    a line every ``every`` seconds with done/total, img/s, MB/s and the ETA. ``progress=False`` prints nothing."""

    def __init__(self, desc: str, total: int | None = None, *, progress: bool = True, every: float = 30.0):
        self.desc, self.total, self.every = desc, total, every
        self.items = self.bytes = 0
        self.t0 = self.last = time.perf_counter()
        self.enabled = progress
        self.bar = None
        if progress and sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=False)

    def rates(self) -> tuple[float, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return self.items / dt, self.bytes / 1e6 / dt

    def update(self, items: int, nbytes: int = 0) -> None:
        self.items += items
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(items)
            self.bar.set_postfix_str(f"{self.rates()[1]:.1f} MB/s", refresh=False)
        elif self.enabled and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        ips, mbps = self.rates()
        done = f"{self.items}/{self.total}" if self.total else f"{self.items}"
        eta = ""
        if self.total and ips > 0:
            eta = f", ETA {max(self.total - self.items, 0) / ips / 60:.1f} min"
        return f"{self.desc}: {done} images, {ips:.0f} img/s, {mbps:.1f} MB/s{eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------------------------------
# the stages
# --------------------------------------------------------------------------------------------------------------------
NO_PROGRESS = Arg("no_progress", False, "no progress bar", flag=True)


def stage_run(fn: Callable[..., dict[str, Any]], source: str) -> Callable[[Any], dict[str, Any]]:
    """A data stage's ``run(ctx)``: ``fn(cfg, --<source>, --out, tracker=..., progress=not --no-progress)``."""
    def run(ctx) -> dict[str, Any]:
        return fn(ctx.cfg, getattr(ctx.args, source), ctx.args.out, tracker=ctx.tracker,
                  progress=not ctx.args.no_progress)

    return run


def log_run(tracker, metrics: dict[str, Any], index: dict[str, Any], name: str) -> None:
    """The stage's figures (all but ``source``) and the index it wrote, on its MLflow run (when tracked)."""
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "source"})
        tracker.log_dict(index, name)
