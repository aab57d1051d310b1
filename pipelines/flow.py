"""Prefect flow ``slotcon-pipeline``: one task per DVC stage, in the DAG's order, one DVC process at a time.

The stage list and the graph come from ``dvc.yaml`` (through DVC's own index), so the flow runs whatever stages exist.
Each task runs ``dvc repro --single-item <stage>`` (``--force`` when asked) in a subprocess with this venv's ``bin``
first on ``PATH``, streams its output line by line into the Prefect run log, retries on failure, and publishes a
markdown artifact with the stage's metrics (the ``metrics`` files ``dvc.yaml`` declares). DVC decides whether a stage
runs: a second flow run on an unchanged workspace re-executes nothing (DVC says "didn't change, skipping").

A stage that still fails after its retries fails its task; the stages downstream of it are not run (their task runs
end Cancelled, "upstream stage X failed"), independent branches still run, and the flow ends Failed.

Before any stage: ``slotcon check`` validates params.yaml, the MLflow experiment is created (SQLite migration races
otherwise) and ONE parent run is opened; its id reaches the stages as ``SLOTCON_PARENT_RUN_ID`` so each stage's run is
its child. After the stages the final metrics go onto the parent, which ends FINISHED or FAILED.

``params_overrides`` (``["pretrain.epochs=5"]`` or ``{"pretrain.epochs": 5}``) runs the pipeline as a DVC experiment:
the overrides are applied to params.yaml with DVC's own ``-S`` code (``dvc.utils.hydra.apply_overrides``), the stages
run one task each as above, and on success ``dvc exp save -n <name>`` records the workspace as an experiment (shown by
``dvc exp show``); params.yaml is then restored, so the next plain run uses the committed values again.
(``dvc exp run -S`` itself would run all stages inside one DVC process, i.e. one task without per-stage retries.)

Run it: ``python -m pipelines.flow [--targets pretrain ...] [--force] [-S pretrain.epochs=5] [--retries 2]``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# run without a Prefect server, the flow starts a temporary one; its default 20 s start-up timeout fails on a busy CPU
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Cancelled  # noqa: E402

DEFAULT_RETRIES = 1
TAIL_LINES = 40  # lines of a failed stage's output repeated in the exception (the whole output is in the log)
VENV_BIN = Path(sys.executable).parent


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message holds the command, the exit status and the output's tail."""


# --------------------------------------------------------------------------------------------------------------------
# the graph, from dvc.yaml
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StageInfo:
    name: str  # DVC addressing: "pretrain", or "sub/dvc.yaml:stage" for nested pipelines
    upstream: tuple[str, ...]  # stages whose outs this stage depends on (direct)
    metrics: tuple[str, ...]  # metrics files declared in dvc.yaml, relative to the repo root
    plots: tuple[str, ...]


def load_stages(root: str | os.PathLike = ".") -> list[StageInfo]:
    """Every pipeline stage of the DVC repo at ``root``, in a topological order of DVC's own graph (networkx; ties
    broken by dvc.yaml order, so the order is deterministic and reads like the file)."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    root = Path(root).resolve()
    # DVC names stages relative to the working directory ("dvc.yaml:a" elsewhere): read the index from the root
    with contextlib.chdir(root), Repo(str(root)) as repo:
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
        order = {s: i for i, s in enumerate(stages)}
        # DVC's edges point from a stage to the stages it depends on: reversed, they run in execution order
        graph = repo.index.graph.subgraph(stages).reverse(copy=True)

        def rel(out) -> str:
            return os.path.relpath(out.fs_path, root)

        return [
            StageInfo(
                name=s.addressing,
                upstream=tuple(u.addressing for u in sorted(graph.predecessors(s), key=order.__getitem__)),
                metrics=tuple(rel(o) for o in s.outs if o.metric),
                plots=tuple(rel(o) for o in s.outs if o.plot),
            )
            for s in nx.lexicographical_topological_sort(graph, key=order.__getitem__)
        ]


def select_stages(stages: Sequence[StageInfo], targets: Sequence[str] | None) -> list[StageInfo]:
    """The targets and everything upstream of them (what ``dvc repro <targets>`` would consider), in DAG order."""
    import networkx as nx

    if not targets:
        return list(stages)
    by_name = {s.name: s for s in stages}
    unknown = [t for t in targets if t not in by_name]
    if unknown:
        raise ValueError(f"dvc.yaml: no stage(s) {unknown}; stages are: {', '.join(by_name)}")
    graph = nx.DiGraph([(u, s.name) for s in stages for u in s.upstream])
    graph.add_nodes_from(by_name)
    keep = set(targets).union(*(nx.ancestors(graph, t) for t in targets))
    return [s for s in stages if s.name in keep]


# --------------------------------------------------------------------------------------------------------------------
# subprocesses with streamed logs
# --------------------------------------------------------------------------------------------------------------------
def stage_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every DVC call: venv first on PATH, offline switches, unbuffered output, calm tqdm."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        {
            "DVC_NO_ANALYTICS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",  # lines reach the Prefect log as they are printed
            "TQDM_MININTERVAL": env.get("TQDM_MININTERVAL", "10"),  # a pipe turns every \r refresh into a log line
        }
    )
    env.update(extra or {})
    return env


def run_streamed(cmd: Sequence[str], *, cwd: str | os.PathLike, env: Mapping[str, str], logger) -> tuple[int, list[str]]:
    """Run ``cmd``; every output line (stdout+stderr) goes to ``logger.info`` as it comes. Returns (rc, all lines)."""
    logger.info("$ %s", " ".join(cmd))
    lines: list[str] = []
    proc = subprocess.Popen(
        list(cmd), cwd=str(cwd), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        errors="replace", bufsize=1,
    )
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:  # universal newlines: tqdm's \r refreshes become separate lines
            line = raw.rstrip()
            if line:
                lines.append(line)
                logger.info("%s", line)
    finally:
        rc = proc.wait()
    return rc, lines


def metrics_markdown(stage: str, status: str, seconds: float, metrics: Mapping[str, float]) -> str:
    rows = "\n".join(f"| `{k}` | {v:.6g} |" for k, v in sorted(metrics.items()))
    body = f"| metric | value |\n|---|---|\n{rows}" if metrics else "_no metrics file declared or written_"
    return f"### DVC stage `{stage}`: {status} in {seconds:.1f} s\n\n{body}\n"


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


# --------------------------------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------------------------------
@task(name="dvc-stage", task_run_name="{stage}", retries=DEFAULT_RETRIES, retry_delay_seconds=2,
      cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, root: str, force: bool = False, metrics_files: Sequence[str] = (),
              env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``dvc repro --single-item [--force] <stage>``; raises :class:`StageFailed` (output tail in the message)."""
    from pipelines import mlflow_runs

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


# --------------------------------------------------------------------------------------------------------------------
# params overrides as a DVC experiment
# --------------------------------------------------------------------------------------------------------------------
def normalize_overrides(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"pretrain.epochs": 5}`` or ``["pretrain.epochs=5"]`` -> DVC ``-S`` strings (``[file:]key=value``)."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        out = []
        for k, v in overrides.items():
            out.append(f"{k}={v if isinstance(v, str) else json.dumps(v)}")
        return out
    if isinstance(overrides, str):
        overrides = [overrides]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"params_overrides: {bad} must look like 'section.key=value' (e.g. pretrain.epochs=5)")
    return list(overrides)


@contextlib.contextmanager
def overridden_params(root: Path, overrides: list[str]) -> Iterator[list[Path]]:
    """Apply ``-S`` overrides to the params files the way ``dvc exp run -S`` does; restore the files on exit."""
    if not overrides:
        yield []
        return
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    per_file = to_path_overrides(overrides)  # {"params.yaml": ["pretrain.epochs=5"], ...}
    saved: dict[Path, bytes] = {}
    try:
        for rel, ovs in per_file.items():
            path = root / rel
            saved[path] = path.read_bytes()
            apply_overrides(str(path), ovs)
        yield list(saved)
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


def exp_name_for(run_name: str) -> str:
    return "flow-" + (re.sub(r"[^A-Za-z0-9_-]", "-", run_name).strip("-") or "run")


# --------------------------------------------------------------------------------------------------------------------
# the flow
# --------------------------------------------------------------------------------------------------------------------
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


def _flow_run_info() -> tuple[str | None, str]:
    from prefect.runtime import flow_run

    fid = flow_run.get_id()
    return (str(fid) if fid else None), (flow_run.get_name() or "local")


def validate_request(root: Path, targets: Sequence[str] | None, overrides: list[str],
                     params_file: str = "params.yaml") -> list[StageInfo]:
    """Targets exist in dvc.yaml and the (overridden) params are valid: one-line ``ValueError`` / ``ConfigError``
    before Prefect starts anything. Returns the stages to run."""
    import shutil
    import tempfile

    from components.check import required_sections
    from components.config import load_all

    stages = select_stages(load_stages(root), targets)
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / Path(params_file).name
        shutil.copy2(root / params_file, copy)
        if overrides:
            from dvc.utils.cli_parse import to_path_overrides
            from dvc.utils.hydra import apply_overrides

            for rel, ovs in to_path_overrides(overrides).items():
                if Path(rel).name != Path(params_file).name:
                    raise ValueError(f"-S {ovs[0]!r}: only {params_file} can be overridden here")
                try:
                    apply_overrides(str(copy), ovs)
                except Exception as exc:  # DVC wraps hydra's (multi-line) reason: keep its first line
                    why = str(exc.__cause__ or exc).strip() or type(exc).__name__
                    if why.startswith("Could not override"):
                        raise ValueError(f"-S {' '.join(ovs)}: {why.splitlines()[0].removeprefix('Could not override ').rstrip('.')}"
                                         f" is not a key of {params_file} (a typo? keys: `slotcon check`)") from None
                    raise ValueError(f"-S {' '.join(ovs)}: not a valid override ({why.splitlines()[0]}); "
                                     "the form is section.key=value, e.g. -S pretrain.epochs=5") from None
        (Path(d) / "dvc.yaml").write_bytes((root / "dvc.yaml").read_bytes())
        load_all(copy, required=required_sections(copy))
    return stages


def mlflow_run_url(tcfg: Any, run_id: str | None) -> str | None:
    """The parent run's page in the MLflow UI (``$SLOTCON_MLFLOW_UI``, default http://127.0.0.1:5000)."""
    if not run_id:
        return None
    base = os.environ.get("SLOTCON_MLFLOW_UI", "http://127.0.0.1:5000").rstrip("/")
    try:
        from pipelines.mlflow_runs import _client

        exp_id = _client(tcfg).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a link is a convenience
        return None
    # workflowType: MLflow 3's UI otherwise opens its GenAI side (a per-browser choice, not the experiment's kind tag)
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning"


def summary_markdown(results: Mapping[str, Any], seconds: float, headline: Mapping[str, float], url: str | None,
                     parent_id: str | None, exp_name: str | None, noop: bool) -> str:
    table = "\n".join(f"| `{n}` | {r['status']} | {r.get('seconds', '')} |" for n, r in results.items())
    figures = "\n".join(f"| `{k}` | {v:.4g} |" for k, v in headline.items())
    if noop:
        mlflow_line = "Nothing ran (every stage up to date): no MLflow run kept."
    elif url:
        mlflow_line = f"MLflow parent run: [{parent_id}]({url})"
    else:
        mlflow_line = f"MLflow parent run: `{parent_id}`" if parent_id else "MLflow: tracking disabled"
    return (f"## slotcon-pipeline in {seconds:.1f} s\n\n| stage | status | seconds |\n|---|---|---|\n{table}\n\n"
            + (f"### Headline metrics\n\n| metric | value |\n|---|---|\n{figures}\n\n" if figures else "")
            + mlflow_line + (f"; DVC experiment: `{exp_name}`" if exp_name else "") + "\n")


def record_failure(flow, flow_run, state) -> None:
    """Flow hook (on_failure, on_crashed): a clear failure record a person or a script finds without the UI: a line
    in ``<repo>/.slotcon/failures.jsonl`` (time, flow run, state, message) and a ``slotcon-pipeline-failure``
    markdown artifact. Notifications (mail, Slack) are a Prefect automation: README "When a run fails"."""
    import datetime

    params = getattr(flow_run, "parameters", None) or {}
    root = Path(params.get("repo_dir") or os.getcwd())
    message = (state.message or "").strip()
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "flow_run": str(flow_run.id), "flow_run_name": flow_run.name, "state": state.name,
              "deployment_id": str(flow_run.deployment_id) if flow_run.deployment_id else None,
              "message": message[:2000]}
    try:
        out = root / ".slotcon" / "failures.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    except OSError:
        pass
    with contextlib.suppress(Exception):
        create_markdown_artifact(
            markdown=f"## slotcon-pipeline {state.name}: `{flow_run.name}`\n\n```\n{message[-3000:]}\n```\n",
            key="slotcon-pipeline-failure", description="why this pipeline run failed")


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
    from components.config import load_section
    from components.tracking.parent import run_name
    from pipelines import mlflow_runs

    logger = get_run_logger()
    t0 = time.perf_counter()
    root = Path(repo_dir or os.getcwd()).resolve()
    overrides = normalize_overrides(params_overrides)
    stages = validate_request(root, targets, overrides, params_file)
    logger.info("repo %s; stages in order: %s", root, " -> ".join(s.name for s in stages))
    flow_run_id, flow_run_name = _flow_run_info()
    exp_name = exp_name_for(flow_run_name) if overrides else None

    with workspace_lock(root, logger), overridden_params(root, overrides):
        if overrides:
            logger.info("params overrides (DVC experiment %s): %s", exp_name, " ".join(overrides))
        check_params(str(root), params_file)
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

        results: dict[str, Any] = {}
        failed: dict[str, str] = {}  # stage -> why (failed itself, or not run because of an upstream failure)
        runner = run_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
        saved_exp = None
        try:
            for s in stages:
                bad_up = [u for u in s.upstream if u in failed]
                if bad_up:
                    first_cause = failed[bad_up[0]]
                    reason = f"upstream stage {bad_up[0]} {'failed' if first_cause == 'failed' else 'was not run'}"
                    skip_stage(s.name, reason)
                    failed[s.name] = "not run"
                    results[s.name] = {"stage": s.name, "status": "not run", "reason": reason}
                    continue
                state = runner(s.name, str(root), force, list(s.metrics), env, return_state=True)
                if state.is_completed():
                    results[s.name] = state.result()
                else:
                    failed[s.name] = "failed"
                    msg = state.message or ""
                    try:
                        state.result()
                    except Exception as exc:  # the stage's error text
                        msg = str(exc)
                    results[s.name] = {"stage": s.name, "status": "failed", "error": msg}
                    logger.error("stage %s failed after %d attempt(s): %s", s.name, retries + 1, msg)
            if overrides and not failed:
                # only the stages this run brought up to date: with targets, the others may have no outs yet
                save_targets = [s.name for s in stages] if targets else []
                include = [a for s in stages for p in (*s.metrics, *s.plots) if (root / p).exists() for a in ("-I", p)]
                rc, lines = run_streamed(["dvc", "exp", "save", "--force", "-n", exp_name, *include, *save_targets],
                                         cwd=root, env=stage_env(), logger=logger)
                if rc != 0:
                    failed["exp save"] = "failed"
                    results["exp save"] = {"status": "failed", "error": "\n".join(lines[-10:])}
                else:
                    saved_exp = exp_name
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
def print_metrics(root: Path, headline: Mapping[str, float]) -> None:
    """The headline metrics, one per line (``dvc metrics show`` prints the same figures, one wide row per file)."""
    print("\nheadline metrics (dvc metrics show; every figure: metrics/details/*.json):")
    for k, v in headline.items():
        print(f"  {k:<32} {v:.6g}")


def main(argv: list[str] | None = None) -> int:
    from components.errors import UserError

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
        print_metrics(root, summary.get("headline") or {})
        if summary.get("parent_run_id"):
            from components.config import TrackingConfig
            from pipelines import mlflow_runs

            cfg = TrackingConfig(tracking_uri=summary["tracking_uri"])
            print("\nMLflow run tree (" + summary["tracking_uri"] + "):")
            print(mlflow_runs.run_tree(cfg, summary["parent_run_id"]))
            if summary.get("mlflow_url"):
                print(f"(with `mlflow server` running: {summary['mlflow_url']})")
        elif summary.get("noop"):
            print("nothing to do: every stage up to date (no MLflow run kept)")
        return 0
    print(state.message or "", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
