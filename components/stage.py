"""The stage runtime: what every ``slotcon <stage>`` does around its own work, written once.

A stage module declares one :class:`Stage` (its name, params section, command-line paths, headline metrics, whether
it may run on several processes) and a ``run(ctx) -> metrics`` function that holds only its own work;
:func:`run_stage` does the rest (params, torchrun self-launch, MLflow run, metrics files, summary line). The CLI
router (:mod:`components.cli`) finds ``STAGE.main`` and ``STAGE.add_arguments`` on the module.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from tqdm import tqdm

from components import tracking
from components.config import load_section
from components.errors import UserError
from components.io import json_default, write_json_atomic


@dataclass(frozen=True)
class Arg:
    """One command-line option of a stage: ``--<name>`` (a path unless ``flag``)."""

    name: str  # "shards" -> --shards, args.shards
    default: Any = None
    help: str = ""
    flag: bool = False  # store_true switch

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


@dataclass
class StageContext:
    """What ``run`` receives: the validated section, the parsed arguments and the stage's MLflow tracker."""

    stage: "Stage"
    cfg: Any  # the params section (a frozen pydantic model)
    tracking_cfg: Any
    args: argparse.Namespace
    tracker: Any  # components.tracking.Tracker (no-op off rank 0 or when disabled)
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def path(self, name: str) -> Path | None:
        value = getattr(self.args, name.replace("-", "_"), None)
        return None if value in (None, "") else Path(value)


@dataclass(frozen=True)
class Stage:
    """A pipeline stage as the runtime sees it: :func:`run_stage` does everything around ``run``."""

    name: str
    section: str
    run: Callable[[StageContext], Mapping[str, Any] | None]
    args: tuple[Arg, ...] = ()
    metrics: str | None = None  # default --metrics path (None: the stage writes no metrics file)
    headline: tuple[str, ...] = ()  # keys kept in --metrics when --details is given; () = every key
    distributed: bool = False  # may run as several processes (torchrun self-launch, process group)
    summary: Callable[[Mapping[str, Any]], str] | None = None  # the line printed at the end
    track: bool = True  # open an MLflow stage run
    # a side command selected by a flag (``slotcon shard --verify``): ``(flag, fn(cfg, args))`` runs alone, with no
    # MLflow run and no metrics written or removed
    aside: tuple[str, Callable[[Any, argparse.Namespace], None]] | None = None

    # ---- argparse -------------------------------------------------------------------------------------------------
    def all_args(self) -> tuple[Arg, ...]:
        common: list[Arg] = []
        if self.metrics is not None:
            common += [Arg("metrics", self.metrics, "metrics JSON (DVC metrics; headline figures)"),
                       Arg("details", None, "optional JSON with every figure (the metrics file keeps the headline)")]
        return tuple(self.args) + tuple(common)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        for a in self.all_args():
            if a.flag:
                parser.add_argument(a.option, dest=a.dest, action="store_true", help=a.help)
            else:
                parser.add_argument(a.option, dest=a.dest, default=a.default, help=a.help)

    def argv(self, args: argparse.Namespace) -> list[str]:
        """The command-line arguments that reproduce ``args`` (for the torchrun relaunch)."""
        out = ["--params", str(getattr(args, "params", "params.yaml"))]
        for a in self.all_args():
            value = getattr(args, a.dest, a.default)
            if a.flag:
                out += [a.option] if value else []
            elif value not in (None, ""):
                out += [a.option, str(value)]
        return out

    # ---- entry point ----------------------------------------------------------------------------------------------
    def main(self, args: argparse.Namespace) -> int:
        return run_stage(self, args)


# --------------------------------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------------------------------
def world_size_of(cfg: Any) -> int:
    """Processes a section asks for: ``nproc_per_node * nnodes`` (1 for sections without them)."""
    return int(getattr(cfg, "nproc_per_node", 1) or 1) * int(getattr(cfg, "nnodes", 1) or 1)


def under_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """True inside a worker started by torchrun (or any launcher that set the rank variables): never launch again."""
    env = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in env or "LOCAL_RANK" in env or int(env.get("WORLD_SIZE", "1")) > 1


def launch_command(stage: Stage, args: argparse.Namespace, cfg: Any, env: Mapping[str, str] | None = None) -> list[str]:
    """``python -m torch.distributed.run [...] -m components <stage> <same arguments>`` for this node.

    One node: ``--standalone``. Several (``nnodes > 1``): ``MASTER_ADDR``, ``MASTER_PORT`` (default 29500) and
    ``NODE_RANK`` must be set on every node (a one-line error otherwise). Only node 0 runs the stage through DVC
    (its ranks write the outputs DVC records); on another node a DVC-launched stage (``DVC_STAGE`` set) is refused
    with the stage command to run there instead: DVC on that node would look for outputs it never gets, or contend
    for node 0's lock in a shared checkout.
    """
    env = os.environ if env is None else env
    nproc, nnodes = int(getattr(cfg, "nproc_per_node", 1)), int(getattr(cfg, "nnodes", 1) or 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        addr = env.get("MASTER_ADDR")
        if not addr or "NODE_RANK" not in env:
            raise UserError(f"params: {stage.section}.nnodes={nnodes} needs MASTER_ADDR (node 0's address), "
                            "MASTER_PORT (default 29500) and NODE_RANK (0..nnodes-1) set on every node")
        if env["NODE_RANK"].strip() not in ("", "0") and env.get("DVC_STAGE"):
            own = " ".join(["slotcon", stage.name, *stage.argv(args)])
            raise UserError(f"NODE_RANK={env['NODE_RANK']}: only node 0 runs `dvc repro {env['DVC_STAGE']}`; on this "
                            f"node run the stage command itself, with the same environment: {own}")
        cmd += [f"--nnodes={nnodes}", f"--node_rank={env['NODE_RANK']}", f"--master_addr={addr}",
                f"--master_port={env.get('MASTER_PORT', '29500')}"]
    return cmd + ["-m", "components", stage.name, *stage.argv(args)]


def _check_devices(stage: Stage, cfg: Any, params: str) -> None:
    import torch  # lazy: torch costs ~1 s at start-up; only the torchrun self-launch checks devices

    nproc = int(getattr(cfg, "nproc_per_node", 1))
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(f"{params}: {stage.section}.nproc_per_node={nproc} but this node has "
                        f"{torch.cuda.device_count()} GPU(s)")


# --------------------------------------------------------------------------------------------------------------------
# metrics files
# --------------------------------------------------------------------------------------------------------------------
def split_metrics(metrics: Mapping[str, Any], headline: tuple[str, ...]) -> dict[str, Any]:
    """The headline subset of ``metrics`` in ``headline`` order; a dotted key (``train.images``) picks a nested value
    and keeps its nesting, so DVC shows the same column name either way. Missing keys are left out."""
    if not headline:
        return dict(metrics)
    out: dict[str, Any] = {}
    for key in headline:
        if key in metrics:
            out[key] = metrics[key]
            continue
        node: Any = metrics
        parts = key.split(".")
        for part in parts:
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
        if node is _MISSING:
            continue
        dst = out
        for part in parts[:-1]:
            dst = dst.setdefault(part, {})
        dst[parts[-1]] = node
    return out


_MISSING = object()


def write_metrics(stage: Stage, args: argparse.Namespace, metrics: Mapping[str, Any]) -> None:
    """Rank 0: headline -> ``--metrics``; everything -> ``--details`` (when given). Atomic writes."""
    details = getattr(args, "details", None)
    path = getattr(args, "metrics", None)
    if details:
        write_json_atomic(details, dict(metrics))
    if path:
        write_json_atomic(path, split_metrics(metrics, stage.headline) if details else dict(metrics))


def remove_stale_outputs(stage: Stage, args: argparse.Namespace) -> None:
    """Delete this stage's metrics files of an earlier run before working: a failed run must not leave old figures
    that look like its own (DVC would otherwise hash them as this run's results)."""
    for name in ("metrics", "details"):
        p = getattr(args, name, None)
        if p:
            Path(p).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------------
# the runtime
# --------------------------------------------------------------------------------------------------------------------
def load_sections(stage: Stage, params: str) -> tuple[Any, Any]:
    cfg = load_section(stage.section, params)
    tcfg = load_section("tracking", params)
    return cfg, tcfg


def run_stage(stage: Stage, args: argparse.Namespace) -> int:
    """Everything around ``stage.run``; returns the process exit status. In this order:

    1. loads and validates the params section (and ``tracking``): a bad value, or a missing section, is a one-line
       error before any work; so is an unusable MLflow store (:func:`components.tracking.store.open_store`);
    2. launches ``python -m torch.distributed.run ... -m components <stage> <same arguments>`` when the section asks
       for more than one process (``nproc_per_node * nnodes > 1``) and this is not already a torchrun worker -- the
       project's one torchrun self-launch -- after creating the MLflow experiment (several ranks migrating a fresh
       SQLite store at once race);
    3. removes the stage's own metrics files left by an earlier run, so a stage that fails leaves no stale figures;
    4. joins the process group (distributed stages), opens the MLflow stage run (child of the pipeline's parent run;
       system metrics on for :data:`TRAINING_STAGES`), logs the input data as MLflow datasets, calls ``run(ctx)``
       with log lines routed through ``tqdm.write`` (never glued onto a progress bar);
    5. writes the metrics atomically on rank 0 (:func:`write_metrics`), records them on the stage run
       (:func:`_record`) and prints the stage's one-line summary.
    """
    from components import dist  # lazy: torch costs ~1 s at start-up; `--help` and side commands never need it

    params = str(getattr(args, "params", "params.yaml"))
    cfg, tcfg = load_sections(stage, params)
    if stage.aside is not None and getattr(args, stage.aside[0], False):
        stage.aside[1](cfg, args)
        return 0
    if stage.track and os.environ.get("RANK", "0") == "0":
        # an unusable MLflow store is a one-line error now, before any work; and the experiment exists before
        # torchrun starts the ranks (several processes migrating a fresh SQLite store at once race)
        tracking.ensure_experiment(tcfg)
    world = world_size_of(cfg) if stage.distributed else 1
    if world > 1 and not under_torchrun():
        _check_devices(stage, cfg, params)
        cmd = launch_command(stage, args, cfg)
        print(f"slotcon {stage.name}: launching " + " ".join(cmd), file=sys.stderr, flush=True)
        return subprocess.call(cmd)

    own_group = stage.distributed and not dist.is_initialized() and dist.init_distributed()
    rank = dist.get_rank()
    try:
        if rank == 0:
            remove_stale_outputs(stage, args)
        if stage.track:
            metrics_files = [args.metrics] if getattr(args, "metrics", None) else []
            ctx_manager = tracking.stage_run(stage.name, cfg, tcfg, metrics_files=metrics_files,
                                             system_metrics=stage.name in TRAINING_STAGES)
        else:
            ctx_manager = contextlib.nullcontext(tracking.Tracker())
        with console(), ctx_manager as tracker:
            if rank == 0:
                print(f"slotcon {stage.name}: started ({stage.section} params from {params}"
                      + (f", {dist.get_world_size()} processes" if dist.get_world_size() > 1 else "") + ")",
                      flush=True)  # stdout: stderr stays the one-line error channel
                _log_inputs(stage, args, tracker)
            ctx = StageContext(stage, cfg, tcfg, args, tracker, rank=rank, world_size=dist.get_world_size())
            metrics = stage.run(ctx)
            if rank == 0 and metrics is not None:
                write_metrics(stage, args, metrics)
                _record(stage, args, metrics, tracker, tcfg)
        if rank == 0 and metrics is not None and stage.summary is not None:
            print(f"slotcon {stage.name}: {stage.summary(metrics)}", flush=True)
    except RuntimeError as exc:  # a collective outside the engine's loop lost a peer: the same one line
        reason = dist.peer_lost(exc)
        if reason is None:
            raise
        raise UserError(dist.lost_peer_message(reason)) from exc
    finally:
        if own_group:
            dist.destroy()
    return 0


# stages that train: MLflow system metrics (CPU, memory, GPU) are recorded for them
TRAINING_STAGES = frozenset({"pretrain", "detect", "segment"})


def _warn(what: str, exc: BaseException) -> None:
    print(f"slotcon: warning: {what} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
          file=sys.stderr, flush=True)


def _log_inputs(stage: Stage, args: argparse.Namespace, tracker: Any) -> None:
    """The data this stage reads, as MLflow datasets (lineage); a problem here is a warning, not a failure."""
    if not tracker.active:
        return
    try:
        tracker.log_inputs(tracking.datasets_for(stage.name, args))
    except Exception as exc:  # noqa: BLE001
        _warn("input datasets not logged to MLflow", exc)


def _record(stage: Stage, args: argparse.Namespace, metrics: Mapping[str, Any], tracker: Any, tcfg: Any) -> None:
    """Rank 0, after the metrics files: every figure on the stage's MLflow run (the ones the stage did not log
    itself), the full dict as an artifact, and the headline figures as tags of the registered backbone evaluated."""
    if not tracker.active:
        return
    full = _jsonable(metrics)
    tracker.log_dict(full, f"{stage.name}.json")
    figures = tracking.numeric_items(full)
    tracker.log_metrics({k: v for k, v in figures.items() if k not in tracker.last_metrics})
    if stage.name == "export":
        return
    headline = tracking.numeric_items(split_metrics(full, stage.headline))
    try:
        tracking.tag_model_versions(stage.name, args, headline, tcfg, tracker._client)
    except Exception as exc:  # noqa: BLE001 - the registry is a record, never a reason to fail a stage
        _warn("registered backbone version not tagged with this stage's figures", exc)


class _TqdmHandler(logging.StreamHandler):
    """A log handler that writes through ``tqdm.write``, so a line never glues onto a progress bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


@contextlib.contextmanager
def console() -> Iterator[None]:
    """Log lines through ``tqdm.write`` while the stage runs; a caller (tests, a notebook) that set up logging keeps
    its own handlers."""
    root = logging.getLogger()
    handler = None
    if not root.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        if handler is not None:
            root.removeHandler(handler)


def _jsonable(obj: Any) -> Any:
    """Metrics as plain JSON types (numpy/torch scalars -> numbers) for MLflow's ``log_dict``."""
    return json.loads(json.dumps(obj, default=json_default))


class _Figures(dict):
    """Metrics for ``str.format_map``: a missing key formats as NaN."""

    def __missing__(self, key: str) -> float:
        return float("nan")


def summary_line(metrics: Mapping[str, Any], head: str, *notes: tuple[str, str]) -> str:
    """A stage's one-line summary: ``head``, then each ``(key, text)`` note whose ``key`` is in ``metrics``.

    ``head`` and the notes are ``str.format_map`` templates over the metrics, whose keys may hold ``/``
    (``" (random init: mIoU {random/mIoU:.4f})"``); a key the metrics lack formats as NaN.
    """
    figures = _Figures(metrics)
    return head.format_map(figures) + "".join(text.format_map(figures) for key, text in notes if key in metrics)
