"""Prefect flow ``slotcon-pipeline``: one task per DVC stage, in the DAG's order, one DVC process at a time.

Each task runs ``dvc repro --single-item <stage>`` and publishes the stage's metrics; DVC decides whether a stage runs
(an unchanged workspace re-executes nothing). A stage that fails after its retries cancels the stages downstream of it;
independent branches still run. One MLflow parent run per flow run; every stage's run is its child.
``params_overrides`` run the pipeline as a DVC experiment (``dvc exp save``), params.yaml restored afterwards.

Run it: ``python -m pipelines.flow [--targets pretrain ...] [--force] [-S pretrain.epochs=5] [--retries 2]``.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled

from components.config import TrackingConfig, load_section
from components.errors import UserError
from components.tracking.parent import run_name
from pipelines import mlflow_runs
from pipelines.dvcgraph import StageInfo, exp_name_for, normalize_overrides, overridden_params, validate_request
from pipelines.reports import (artifact_key, flow_run_info, metrics_markdown, mlflow_run_url, print_metrics,
                               record_failure, summary_markdown)
from pipelines.shell import StageFailed, run_streamed, stage_env

DEFAULT_RETRIES = 1
TAIL_LINES = 40  # lines of a failed stage's output repeated in the exception (the whole output is in the log)


@task(name="dvc-stage", task_run_name="{stage}", retries=DEFAULT_RETRIES, retry_delay_seconds=2,
      cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, root: str, force: bool = False, metrics_files: Sequence[str] = (),
              env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``dvc repro --single-item [--force] <stage>``; raises :class:`StageFailed` (output tail in the message)."""
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    t0 = time.perf_counter()
    rc, lines = run_streamed(cmd, cwd=root, env=stage_env(env), logger=logger)
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(lines[-TAIL_LINES:])
        raise StageFailed(f"DVC stage {stage!r} failed: `{' '.join(cmd)}` exited with status {rc}:\n{tail}")
    short = stage.split(":")[-1]
    ran = any(f"Running stage '{stage}'" in ln for ln in lines)
    status = "ran" if ran else "up to date"
    metrics = mlflow_runs.read_metrics_files(root, {short: metrics_files})
    create_markdown_artifact(
        markdown=metrics_markdown(stage, status, seconds, metrics),
        key=artifact_key(f"{short}-metrics"),
        description=f"metrics of DVC stage {stage}",
    )
    logger.info("stage %s: %s in %.1f s", stage, status, seconds)
    return {"stage": stage, "status": status, "seconds": round(seconds, 3), "metrics": metrics}


@task(name="dvc-stage-not-run", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def skip_stage(stage: str, reason: str):
    """A stage downstream of a failed one: recorded as a Cancelled task run so the UI shows it was not run."""
    get_run_logger().warning("stage %s not run: %s", stage, reason)
    return Cancelled(message=f"not run: {reason}")


@task(name="check-params", cache_policy=NO_CACHE, persist_result=False)
def check_params(root: str, params_file: str = "params.yaml") -> None:
    """``slotcon check``: every params section valid before any stage starts."""
    logger = get_run_logger()
    rc, lines = run_streamed(["slotcon", "check", "--params", params_file], cwd=root, env=stage_env(), logger=logger)
    if rc != 0:
        raise StageFailed(f"slotcon check failed (status {rc}): " + " ".join(lines[-5:]))


@contextlib.contextmanager
def workspace_lock(root: Path, logger) -> Iterator[None]:
    """One pipeline run per workspace (DVC would refuse a second concurrent repro anyway): wait for the first."""
    lock_dir = root / ".dvc" / "tmp"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "slotcon-pipeline.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another pipeline run holds %s; waiting for it", fh.name)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _open_parent(root: Path, params_file: str, targets: Sequence[str] | None, force: bool, overrides: list[str],
                 exp_name: str | None, flow_run: tuple[str | None, str],
                 logger) -> tuple[TrackingConfig, str | None, dict[str, str]]:
    """The MLflow parent run of this flow run; returns (store, parent id or None, env for the stage processes)."""
    flow_run_id, flow_run_name = flow_run
    tcfg = mlflow_runs.resolve_store(load_section("tracking", root / params_file), root)
    suffix = f"[{','.join(targets)}]" if targets else ""
    parent_id = mlflow_runs.open_parent_run(
        tcfg, root, run_name=run_name(root, params_file, exp_name=exp_name, suffix=suffix),
        flow_run_id=flow_run_id, params_file=params_file,
        tags={"slotcon.targets": ",".join(targets or []) or "all", "slotcon.force": force,
              "slotcon.params_overrides": " ".join(overrides), "prefect.flow_run_name": flow_run_name,
              **({"dvc.experiment": exp_name} if exp_name else {})},
    )
    env = {"SLOTCON_FLOW_RUN_ID": flow_run_id or ""}
    if parent_id:
        env["SLOTCON_PARENT_RUN_ID"] = parent_id
        env["MLFLOW_TRACKING_URI"] = tcfg.tracking_uri
        logger.info("MLflow parent run %s (%s)", parent_id, tcfg.tracking_uri)
    return tcfg, parent_id, env


def _run_stages(stages: Sequence[StageInfo], runner, root: Path, force: bool, env: Mapping[str, str], retries: int,
                results: dict[str, Any], failed: dict[str, str], logger) -> None:
    """Each stage as a task, in order; a stage downstream of a failure is recorded as not run (``failed`` says
    why per stage: it failed itself, or was not run because of an upstream failure)."""
    for s in stages:
        bad_up = [u for u in s.upstream if u in failed]
        if bad_up:
            first_cause = failed[bad_up[0]]
            reason = f"upstream stage {bad_up[0]} {'failed' if first_cause == 'failed' else 'was not run'}"
            skip_stage(s.name, reason)
            failed[s.name] = "not run"
            results[s.name] = {"stage": s.name, "status": "not run", "reason": reason}
            continue
        state = runner(s.name, str(root), force, list(s.metrics), dict(env), return_state=True)
        if state.is_completed():
            results[s.name] = state.result()
            continue
        failed[s.name] = "failed"
        msg = state.message or ""
        try:
            state.result()
        except Exception as exc:  # the stage's error text
            msg = str(exc)
        results[s.name] = {"stage": s.name, "status": "failed", "error": msg}
        logger.error("stage %s failed after %d attempt(s): %s", s.name, retries + 1, msg)


def _save_experiment(root: Path, stages: Sequence[StageInfo], targets: Sequence[str] | None, exp_name: str,
                     results: dict[str, Any], failed: dict[str, str], logger) -> str | None:
    """``dvc exp save`` of the workspace the overridden run produced; the experiment's name, or None on failure."""
    # only the stages this run brought up to date: with targets, the others may have no outs yet
    save_targets = [s.name for s in stages] if targets else []
    include = [a for s in stages for p in (*s.metrics, *s.plots) if (root / p).exists() for a in ("-I", p)]
    rc, lines = run_streamed(["dvc", "exp", "save", "--force", "-n", exp_name, *include, *save_targets],
                             cwd=root, env=stage_env(), logger=logger)
    if rc != 0:
        failed["exp save"] = "failed"
        results["exp save"] = {"status": "failed", "error": "\n".join(lines[-10:])}
        return None
    return exp_name


@flow(name="slotcon-pipeline", log_prints=True, persist_result=False, on_failure=[record_failure],
      on_crashed=[record_failure])
def slotcon_pipeline(
    targets: list[str] | None = None,
    force: bool = False,
    params_overrides: dict[str, Any] | list[str] | None = None,
    retries: int = DEFAULT_RETRIES,
    retry_delay_seconds: float = 2.0,
    repo_dir: str | None = None,
    params_file: str = "params.yaml",
) -> dict[str, Any]:
    """Run the DVC stages of ``repo_dir`` (default: the working directory) as Prefect tasks, one at a time.

    Args:
        targets: stages to bring up to date (plus their upstream stages); default: every stage in dvc.yaml.
        force: re-run the selected stages even if DVC finds them up to date (``dvc repro --force``).
        params_overrides: ``["pretrain.epochs=5"]`` or ``{"pretrain.epochs": 5}``: run as a DVC experiment
            (saved with ``dvc exp save``; params.yaml is restored afterwards).
        retries: extra attempts of a failing stage before its task fails.
        retry_delay_seconds: pause between attempts.
        repo_dir: the DVC/git repository (deployments set it through their working directory).
        params_file: the params file that ``slotcon check`` validates and the MLflow parent run records.
    Returns ``{"stages": {name: result}, "parent_run_id", "experiment", "seconds", "headline"}``; a failed stage fails
    the flow. A run in which every stage was up to date keeps no MLflow run (see ``discard_noop_run``).
    """
    logger = get_run_logger()
    t0 = time.perf_counter()
    root = Path(repo_dir or os.getcwd()).resolve()
    overrides = normalize_overrides(params_overrides)
    stages = validate_request(root, targets, overrides, params_file)
    logger.info("repo %s; stages in order: %s", root, " -> ".join(s.name for s in stages))
    flow_run = flow_run_info()
    exp_name = exp_name_for(flow_run[1]) if overrides else None

    with workspace_lock(root, logger), overridden_params(root, overrides):
        if overrides:
            logger.info("params overrides (DVC experiment %s): %s", exp_name, " ".join(overrides))
        check_params(str(root), params_file)
        tcfg, parent_id, env = _open_parent(root, params_file, targets, force, overrides, exp_name,
                                               flow_run, logger)
        results: dict[str, Any] = {}
        failed: dict[str, str] = {}
        saved_exp = None
        try:
            runner = run_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
            _run_stages(stages, runner, root, force, env, retries, results, failed, logger)
            if overrides and not failed:
                saved_exp = _save_experiment(root, stages, targets, exp_name, results, failed, logger)
        finally:
            headline = mlflow_runs.read_metrics_files(root, {s.name: s.metrics for s in stages})
            noop = not failed and all(r.get("status") == "up to date" for r in results.values()) \
                and len(results) == len(stages)
            mlflow_runs.close_parent_run(
                tcfg, parent_id, root, metrics=headline, failed=bool(failed) or len(results) < len(stages),
                tags={"dvc.experiment": saved_exp} if saved_exp else None,
            )
            if noop:
                mlflow_runs.discard_noop_run(tcfg, parent_id)

    seconds = time.perf_counter() - t0
    url = None if noop else mlflow_run_url(tcfg, parent_id)
    summary = {"stages": results, "parent_run_id": None if noop else parent_id, "experiment": saved_exp,
               "seconds": round(seconds, 1), "tracking_uri": tcfg.tracking_uri if parent_id else None,
               "headline": headline, "mlflow_url": url, "noop": noop}
    create_markdown_artifact(
        markdown=summary_markdown(results, seconds, headline, url, parent_id, saved_exp, noop),
        key="slotcon-pipeline-summary",
        description="stage states and headline metrics of this pipeline run",
    )
    if failed:
        first = next(n for n, why in failed.items() if why == "failed")
        raise StageFailed(f"pipeline failed at stage {first}: {results[first].get('error', '')}")
    return summary


# --------------------------------------------------------------------------------------------------------------------
# command line (``make demo``)
# --------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.flow", description=__doc__.split("\n")[0])
    p.add_argument("--targets", nargs="*", default=None, help="stages (plus upstream); default: all")
    p.add_argument("--force", action="store_true", help="re-run even if up to date")
    p.add_argument("-S", "--set-param", action="append", default=[], dest="overrides",
                   help="params override section.key=value (repeatable): runs as a DVC experiment")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES)
    p.add_argument("--repo-dir", default=None)
    args = p.parse_args(argv)
    root = Path(args.repo_dir or os.getcwd()).resolve()
    try:  # bad targets or overrides: one line now, not a traceback after Prefect's start-up
        validate_request(root, args.targets, normalize_overrides(args.overrides))
    except (UserError, ValueError) as exc:
        print(f"python -m pipelines.flow: error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    state = slotcon_pipeline(targets=args.targets, force=args.force, params_overrides=args.overrides or None,
                             retries=args.retries, repo_dir=args.repo_dir, return_state=True)
    wall = time.perf_counter() - t0
    print(f"\nslotcon-pipeline: {state.name} in {wall:.1f} s (wall, incl. Prefect start-up)")
    if state.is_completed():
        summary = state.result()
        for name, r in summary["stages"].items():
            print(f"  {name:<12} {r['status']:<11} {r.get('seconds', 0):>7.1f} s")
        print_metrics(summary.get("headline") or {})
        if summary.get("parent_run_id"):
            cfg = TrackingConfig(tracking_uri=summary["tracking_uri"])
            print("\nMLflow run tree (" + summary["tracking_uri"] + "):")
            print(mlflow_runs.run_tree(cfg, summary["parent_run_id"]))
            if summary.get("mlflow_url"):
                served = os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://"))
                print(f"(MLflow UI{'' if served else ', with `mlflow server` running'}: {summary['mlflow_url']})")
        elif summary.get("noop"):
            print("nothing to do: every stage up to date (no MLflow run kept)")
        return 0
    print(state.message or "", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
