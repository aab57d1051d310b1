"""Prefect flow ``slotcon-compare``: is SlotCon better here? Methods x seeds, each cell through the same stages.

    python -m pipelines.compare                                   # random, mocov2, slotcon, sim x seeds 0 1 2
    python -m pipelines.compare --methods random mocov2 slotcon --seeds 0 1 2 3 4 -S pretrain.epochs=20

A cell runs the stage CLIs on its own params file and folder (``<out>/cells/<method>-s<seed>/``); the data is made
once per grid; finished stages are stamped, so an interrupted grid continues. The figures are aggregated by
:mod:`components.compare` into ``metrics/compare.{json,md}`` and ``plots/compare.png``, and logged as one MLflow parent
run (tag ``slotcon.compare=1``) with a child per cell.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import mlflow
import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components import compare as cmp
from components.config import SECTIONS, parse_section
from components.io import write_json_atomic, write_text_atomic
from components.tracking import Tracker, flatten
from pipelines import mlflow_runs
from pipelines.reports import flow_run_info
from pipelines.shell import StageFailed, run_streamed, stage_env

DEFAULT_METHODS = ("random", "mocov2", "slotcon", "sim")
DEFAULT_SEEDS = (0, 1, 2)


# --------------------------------------------------------------------------------------------------------------------
# the stage commands of a cell (the same CLIs dvc.yaml runs; paths are the cell's)
# --------------------------------------------------------------------------------------------------------------------
def stage_command(stage: str, cell: Path, data: Path) -> list[str]:
    p, shards, m = str(cell / "params.yaml"), str(data / "shards"), cell / "metrics"
    last, backbone = str(cell / "models" / "pretrain" / "last.pt"), str(cell / "models" / "backbone.pt")
    args = {
        "pretrain": ["--shards", shards, "--out", str(cell / "models" / "pretrain"), "--checkpoints",
                     str(cell / "checkpoints" / "pretrain"), "--plots", str(cell / "plots" / "pretrain")],
        "export": ["--checkpoint", last, "--out", backbone],
        "probe": ["--shards", shards, "--backbone", backbone],
        "unsup_seg": ["--shards", shards, "--checkpoint", last],
        "segment": ["--shards", shards, "--backbone", backbone, "--out", str(cell / "models" / "segment"),
                    "--plots", str(cell / "plots" / "segment")],
        "detect": ["--shards", shards, "--backbone", backbone, "--out", str(cell / "models" / "detect"),
                   "--checkpoints", str(cell / "checkpoints" / "detect"), "--plots", str(cell / "plots" / "detect")],
    }[stage]
    metrics = [] if stage == "export" else ["--metrics", str(m / f"{stage}.json")]
    return [sys.executable, "-m", "components", stage, "--params", p, *args, *metrics]


def data_commands(params: Path, data: Path) -> list[list[str]]:
    base = [sys.executable, "-m", "components"]
    return [
        base + ["scenes", "--params", str(params), "--out", str(data / "scenes"), "--metrics",
                str(data / "scenes.json")],
        base + ["prepare", "--params", str(params), "--scenes", str(data / "scenes"), "--out", str(data / "raw"),
                "--metrics", str(data / "prepare.json")],
        base + ["shard", "--params", str(params), "--raw", str(data / "raw"), "--out", str(data / "shards"),
                "--metrics", str(data / "shard.json")],
    ]


def _stamp(folder: Path, name: str) -> Path:
    return folder / "done" / name


def _is_done(folder: Path, name: str, key: str) -> bool:
    s = _stamp(folder, name)
    return s.is_file() and s.read_text().strip() == key


def _mark_done(folder: Path, name: str, key: str) -> None:
    write_text_atomic(_stamp(folder, name), key + "\n")


def _run(cmd: Sequence[str], root: Path, env: dict[str, str], what: str) -> float:
    logger = get_run_logger()
    t0 = time.perf_counter()
    rc, lines = run_streamed(cmd, cwd=root, env=stage_env(env), logger=logger)
    if rc != 0:
        raise StageFailed(f"{what}: `{' '.join(cmd)}` exited with status {rc}:\n" + "\n".join(lines[-30:]))
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------------------------------
@task(name="compare-data", cache_policy=NO_CACHE, persist_result=False)
def make_data(root: str, params_path: str, data_dir: str, key: str, env: dict[str, str],
              force: bool) -> dict[str, Any]:
    """scenes -> prepare -> shard into ``data_dir`` (skipped when done for the same scenes/data/shard params)."""
    data = Path(data_dir)
    if not force and _is_done(data, "shards", key) and (data / "shards" / "index.json").is_file():
        get_run_logger().info("data %s: up to date", data)
        return {"status": "up to date", "seconds": 0.0}
    seconds = sum(_run(c, Path(root), env, "compare data") for c in data_commands(Path(params_path), data))
    _mark_done(data, "shards", key)
    return {"status": "ran", "seconds": round(seconds, 1)}


@task(name="compare-stage", task_run_name="{label}", retries=0, cache_policy=NO_CACHE, persist_result=False)
def run_cell_stage(label: str, root: str, cell_dir: str, data_dir: str, stage: str, method: str, seed: int,
                   arch: str, key: str, env: dict[str, str], force: bool) -> dict[str, Any]:
    """One stage of one cell; skipped when its stamp matches the cell's params."""
    cell = Path(cell_dir)
    if not force and _is_done(cell, stage, key):
        get_run_logger().info("%s: up to date", label)
        return {"status": "up to date", "seconds": 0.0}
    t0 = time.perf_counter()
    if stage == "pretrain" and method in cmp.BASELINES:
        cmp.write_random_init(cell / "models" / "pretrain", arch=arch, seed=seed)
    else:
        _run(stage_command(stage, cell, Path(data_dir)), Path(root), env, label)
    _mark_done(cell, stage, key)
    return {"status": "ran", "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------------------------------------------
# MLflow: the comparison parent and one child per cell
# --------------------------------------------------------------------------------------------------------------------
def _open_runs(root: Path, params_file: Path, params: dict, cells: list[tuple[str, int]], flow_run_id: str | None,
               name: str):
    tcfg = mlflow_runs.resolve_store(parse_section("tracking", params.get("tracking")), root)
    parent = mlflow_runs.open_parent_run(tcfg, root, run_name=name, flow_run_id=flow_run_id,
                                         params_file=str(params_file.resolve()),
                                         tags={"slotcon.compare": "1", "mlflow.source.name": "pipelines/compare.py"})
    if parent is None:
        return tcfg, None, {}
    client = mlflow.MlflowClient(tcfg.tracking_uri)
    exp_id = client.get_run(parent).info.experiment_id
    children = {}
    for method, seed in cells:
        run = client.create_run(exp_id, run_name=f"{method} seed {seed}", tags={
            "mlflow.parentRunId": parent, "slotcon.compare.method": method, "slotcon.compare.seed": str(seed)})
        children[(method, seed)] = run.info.run_id
    return tcfg, parent, children


def _close_runs(tcfg, parent, children, cell_metrics, summary, files, failed: bool) -> None:
    if parent is None:
        return
    client = mlflow.MlflowClient(tcfg.tracking_uri)
    for cell, run_id in children.items():
        Tracker(run_id, client).log_metrics(flatten(cell_metrics.get(cell, {})))
        client.set_terminated(run_id, status="FAILED" if cell not in cell_metrics else "FINISHED")
    tracker = Tracker(parent, client)
    flat = {}
    for method, per in summary["methods"].items():
        for metric, d in per.items():
            for stat in ("mean", "std"):
                if d[stat] is not None:
                    flat[f"{method}.{metric.replace('/', '.')}.{stat}"] = d[stat]
    tracker.log_metrics(flat)
    for f in files:
        tracker.log_artifact(f, "compare")
    client.set_terminated(parent, status="FAILED" if failed else "FINISHED")


# --------------------------------------------------------------------------------------------------------------------
# the flow
# --------------------------------------------------------------------------------------------------------------------
def _read_cell(cell: Path, stages: Sequence[str]) -> dict[str, Any]:
    out = {}
    for stage in stages:
        p = cell / "metrics" / f"{stage}.json"
        if p.is_file():
            out[stage] = json.loads(p.read_text())
    return out


@flow(name="slotcon-compare", log_prints=True, persist_result=False)
def slotcon_compare(
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    stages: list[str] | None = None,
    params_overrides: list[str] | dict[str, Any] | None = None,
    out_dir: str = "runs/compare",
    metrics_file: str = "metrics/compare.json",
    plot_file: str = "plots/compare.png",
    repo_dir: str | None = None,
    params_file: str = "params.yaml",
    force: bool = False,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run the grid ``methods x seeds`` through ``stages`` and aggregate (see the module docstring). Defaults:
    :data:`DEFAULT_METHODS`, :data:`DEFAULT_SEEDS`, every stage.
    ``threads``: intra-op threads of every stage process (``OMP_NUM_THREADS``; None: the libraries' default). One by
    default: the grid runs one stage at a time on a CPU that is usually shared, where spinning OpenMP threads cost
    far more than a second core gains (this box: Mask R-CNN 13.5 s/iteration with 2 threads under load).

    ``params_overrides`` (``["pretrain.epochs=20"]`` or a mapping) apply to every cell on top of
    :data:`components.compare.DEFAULT_OVERRIDES`. Returns ``{"summary", "cells", "seconds", "parent_run_id"}``.
    """
    logger = get_run_logger()
    t0 = time.perf_counter()
    methods = list(methods or DEFAULT_METHODS)
    seeds = [int(s) for s in (seeds if seeds is not None else DEFAULT_SEEDS)]
    stages = list(stages or cmp.STAGES)
    root = Path(repo_dir or os.getcwd()).resolve()
    out = (root / out_dir).resolve()
    overrides = {**cmp.DEFAULT_OVERRIDES, **cmp.parse_overrides(params_overrides)}
    cells = [(m, int(s)) for s in seeds for m in methods]  # seed-major: a stopped grid still compares every method
    cell_params = _grid_params(root / params_file, out, overrides, cells, stages)
    data_params = cmp.cell_params(yaml.safe_load((root / params_file).read_text()) or {}, overrides, methods[0],
                                  seeds[0])
    data_key = cmp.digest({k: data_params.get(k) for k in ("scenes", "data", "shard")})
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_text_atomic(data / "params.yaml", yaml.safe_dump(data_params, sort_keys=False))

    thread_env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} if threads else {}
    flow_run_id, flow_run_name = flow_run_info()
    tcfg, parent, children = _open_runs(root, data / "params.yaml", data_params, cells, flow_run_id,
                                        f"compare {flow_run_name}")
    failed, cell_metrics, timings = False, {}, {}
    try:
        data_env = {"MLFLOW_TRACKING_URI": tcfg.tracking_uri, **thread_env,
                    **({"SLOTCON_PARENT_RUN_ID": parent} if parent else {})}
        make_data(str(root), str(data / "params.yaml"), str(data), data_key, data_env, force)
        for method, seed in cells:
            env = {"MLFLOW_TRACKING_URI": tcfg.tracking_uri, "SLOTCON_FLOW_RUN_ID": flow_run_id or "", **thread_env}
            if (method, seed) in children:
                env["SLOTCON_PARENT_RUN_ID"] = children[(method, seed)]
            label = f"{method}-s{seed}"
            timings[label], cell_metrics[(method, seed)] = _run_cell(
                root, out / "cells" / label, data, method, seed, cell_params[(method, seed)], stages, env, force)
            logger.info("cell %s seed %d done in %.0f s", method, seed, timings[label])
    except BaseException:
        failed = True
        raise
    finally:
        metrics = [f"{s}/{k}" for s, k, _ in cmp.METRICS if s in stages]
        summary = cmp.summarize(cmp.collect(cell_metrics), methods, metrics)
        result = {"grid": {"methods": list(methods), "seeds": [int(s) for s in seeds], "stages": list(stages)},
                  "overrides": overrides, "complete": not failed and len(cell_metrics) == len(cells),
                  "cell_seconds": timings, "seconds": round(time.perf_counter() - t0, 1), **summary}
        files = _write_results(root, result, summary, methods, metrics, metrics_file, plot_file) if cell_metrics else []
        _close_runs(tcfg, parent, children, {c: {s: {k: v for k, v in m.items() if not isinstance(v, dict)}
                                                  for s, m in d.items()} for c, d in cell_metrics.items()},
                    summary, files, failed)
    return {"summary": summary, "cells": {f"{m}-s{s}": v for (m, s), v in cell_metrics.items()},
            "seconds": result["seconds"], "parent_run_id": parent}


def _grid_params(params_file: Path, out: Path, overrides: dict, cells: list[tuple[str, int]],
                 stages: Sequence[str]) -> dict[tuple[str, int], dict]:
    """Every cell's params, each validated before anything runs (a typo fails here, not after an hour)."""
    unknown = [s for s in stages if s not in cmp.STAGES]
    if unknown:
        raise ValueError(f"stages {unknown} unknown (allowed: {', '.join(cmp.STAGES)})")
    base = yaml.safe_load(params_file.read_text()) or {}
    cell_params = {c: cmp.cell_params(base, overrides, *c) for c in cells}
    for c, p in cell_params.items():
        for section in SECTIONS:
            parse_section(section, p.get(section), f"{out}/cells/{c[0]}-s{c[1]}/params.yaml")
        if c[0] not in cmp.BASELINES and p["pretrain"]["method"] != c[0]:
            raise ValueError(f"method {c[0]!r} is not a pretrain.method")
    return cell_params


def _run_cell(root: Path, cell: Path, data: Path, method: str, seed: int, params: dict, stages: Sequence[str],
              env: dict[str, str], force: bool) -> tuple[float, dict[str, Any]]:
    """One cell's stages in order; returns (seconds, its metrics per stage)."""
    write_text_atomic(cell / "params.yaml", yaml.safe_dump(params, sort_keys=False))
    key = cmp.digest(params)
    arch = parse_section("pretrain", params["pretrain"]).arch
    t_cell = time.perf_counter()
    for stage in ("pretrain", "export", *stages):
        run_cell_stage(f"{method}-s{seed}:{stage}", str(root), str(cell), str(data), stage, method, seed,
                       arch, key, env, force)
    return round(time.perf_counter() - t_cell, 1), _read_cell(cell, stages)


def _write_results(root: Path, result: dict, summary: dict, methods: Sequence[str], metrics: Sequence[str],
                   metrics_file: str, plot_file: str) -> list[Path]:
    """metrics/compare.json, plots/compare.png and the README table metrics/compare.md; returns their paths."""
    write_json_atomic(root / metrics_file, result)
    cmp.write_plot(summary, methods, metrics, root / plot_file)
    md = root / Path(metrics_file).with_suffix(".md")
    write_text_atomic(md, cmp.markdown_table(summary, methods, metrics) + "\n")
    get_run_logger().info("comparison table:\n%s", md.read_text())
    return [root / metrics_file, root / plot_file, md]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="random and/or pretrain methods")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    ap.add_argument("--stages", nargs="+", default=list(cmp.STAGES), choices=cmp.STAGES)
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                    help="section.key=value for every cell (after the comparison's defaults)")
    ap.add_argument("--out", default="runs/compare", help="cells, data and stamps")
    ap.add_argument("--force", action="store_true", help="re-run every stage even if its stamp matches")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per stage process (0: library default)")
    args = ap.parse_args(argv)
    res = slotcon_compare(methods=args.methods, seeds=args.seeds, stages=args.stages,
                          params_overrides=args.overrides, out_dir=args.out, force=args.force,
                          threads=args.threads or None)
    print(f"comparison done in {res['seconds']:.0f} s -> metrics/compare.json, plots/compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
