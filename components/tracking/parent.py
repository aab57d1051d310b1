"""The MLflow parent run of one pipeline run (tag ``slotcon.pipeline=1``), which groups its stage runs: one mechanism
for a Prefect flow run and a plain ``dvc repro``. :func:`open_parent` and :func:`close_parent` are the only code that
writes one; the flow (:mod:`pipelines.flow`) calls them around its stages, and under ``dvc repro`` / ``dvc exp run``
each stage finds or opens its invocation's parent (:func:`dvc_parent`) and closes it when it ends.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from components.config import parse_yaml
from components.tracking.lineage import dvc_lock_hash, git_commit
from components.tracking.repair import OWNER_TAG, owner_key
from components.tracking.store import create_run, tracking_uri
from components.tracking.tracker import Tracker, flatten, numeric_items

EXP_NAME_ENV = "DVC_EXP_NAME"  # set by `dvc exp run` for every stage command


# --------------------------------------------------------------------------------------------------------------------
# what a parent shows
# --------------------------------------------------------------------------------------------------------------------
def _load_yaml(path: Path) -> Any:
    try:
        return parse_yaml(path.read_text(), path)
    except Exception:  # noqa: BLE001 - a broken file shows as "no params" here; slotcon check reports it
        return None


def stage_metrics_files(root: str | os.PathLike) -> dict[str, list[str]]:
    """``{stage: [metrics files]}`` as ``dvc.yaml`` at ``root`` declares them (plain YAML read: no DVC import)."""
    spec = _load_yaml(Path(root) / "dvc.yaml") or {}
    out: dict[str, list[str]] = {}
    for name, st in (spec.get("stages") or {}).items():
        files = []
        for m in (st or {}).get("metrics") or []:
            files.append(m if isinstance(m, str) else next(iter(m)))
        out[name] = files
    return out


def headline_metrics(root: str | os.PathLike, stage_files: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """``{stage: [metrics files]}`` -> flat ``{"<stage>.<key>": number}`` of every file that exists and parses."""
    out: dict[str, float] = {}
    for stage, files in stage_files.items():
        for rel in files:
            p = Path(root) / rel
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, Mapping):
                out.update(numeric_items({stage.split(":")[-1]: data}))
    return out


def params_diff(root: str | os.PathLike, params_file: str = "params.yaml", limit: int = 3) -> list[str]:
    """``key=value`` for every param of the workspace's params file that differs from the committed one."""
    root = Path(root)
    now = _load_yaml(root / params_file)
    try:
        text = subprocess.run(["git", "show", f"HEAD:{params_file}"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout
        base = parse_yaml(text, params_file) if text else None
    except Exception:  # noqa: BLE001 - no git, no commit: nothing to compare with
        base = None
    if not isinstance(now, Mapping) or not isinstance(base, Mapping):
        return []
    a, b = flatten(base), flatten(now)
    return [f"{k}={b[k]}" for k in b if a.get(k, object()) != b[k]]


def run_name(root: str | os.PathLike, params_file: str = "params.yaml", *, exp_name: str | None = None,
             suffix: str = "") -> str:
    """``pretrain.epochs=5, ...`` (what varied), else ``HEAD <commit>``; ``<exp>: `` in front for DVC experiments."""
    diff = params_diff(root, params_file)
    if diff:
        what = ", ".join(diff[:3]) + (f" +{len(diff) - 3} more" if len(diff) > 3 else "")
    else:
        what = "HEAD " + git_commit(cwd=root)[:7]
    return (f"{exp_name}: " if exp_name else "") + what + (f" {suffix}" if suffix else "")


# --------------------------------------------------------------------------------------------------------------------
# open / close: the one implementation
# --------------------------------------------------------------------------------------------------------------------
def open_parent(client: Any, exp_id: str, root: str | os.PathLike, *, name: str, tags: Mapping[str, Any] | None = None,
                params_file: str = "params.yaml", uri: str = "") -> str:
    """Create the parent run: tags, the whole params file as params (flattened), the params file as an artifact.

    ``name`` is what varied against the committed params file (:func:`run_name`); the tags carry the git commit, the
    ``dvc.lock`` hash and the varied params, so the parents of a flow and of a ``dvc repro`` compare side by side."""
    root = Path(root)
    all_tags = {
        "slotcon.pipeline": "1",
        "mlflow.runName": name,
        "git.commit": git_commit(cwd=root),
        "dvc.lock.md5": dvc_lock_hash(root / "dvc.lock"),
        OWNER_TAG: owner_key(),
    }
    varied = params_diff(root, params_file)
    if varied:
        all_tags["slotcon.params_changed"] = " ".join(varied)[:5000]
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    run = create_run(client, exp_id, all_tags, name, uri)
    tracker = Tracker(run.info.run_id, client, uri)
    params = _load_yaml(root / params_file)
    if isinstance(params, Mapping):
        tracker.log_params(params)
    tracker.log_artifact(root / params_file)
    tracker.flush()
    return run.info.run_id


def close_parent(client: Any, run_id: str, root: str | os.PathLike, *, metrics: Mapping[str, float], status: str,
                 tags: Mapping[str, Any] | None = None, uri: str = "") -> None:
    """Headline metrics onto the parent, ``dvc.lock`` as an artifact, the final lock hash, end FINISHED/FAILED.

    ``metrics`` are the stages' headline metrics files (``<stage>.<key>``, what DVC compares; :func:`headline_metrics`),
    read from the files, never copied from a stage's last logged value."""
    root = Path(root)
    tracker = Tracker(run_id, client, uri)
    tracker.log_metrics(dict(metrics))
    tracker.log_artifact(root / "dvc.lock")
    tracker.set_tags({"dvc.lock.md5.final": dvc_lock_hash(root / "dvc.lock"), **(tags or {})})
    tracker.terminate(status)
    tracker.flush()


# --------------------------------------------------------------------------------------------------------------------
# dvc repro / dvc exp run without a flow
# --------------------------------------------------------------------------------------------------------------------
def dvc_invocation() -> tuple[str, str] | None:
    """``(key, "dvc repro ...")`` of the ``dvc repro``/``dvc exp run`` process among this process's ancestors; None
    when no DVC process launched us (or psutil can't tell).

    Why a process search: DVC hands a stage command only ``DVC_ROOT`` and ``DVC_STAGE`` (plus ``DVC_EXP_NAME`` /
    ``DVC_EXP_BASELINE_REV`` under ``dvc exp run``), none of which differs between two ``dvc repro`` runs, and there
    is no hook around an invocation. The one thing unique to an invocation that a stage can see is the ``dvc``
    process that launched it (a parent, or a grand-parent through ``sh -c`` and ``torchrun``); its pid alone is
    reused, so the key is host + pid + start time, which psutil reads portably. A stage run by hand has no such
    ancestor: no parent."""
    try:
        import psutil  # lazy: optional (ImportError is caught below: no implicit parent without it)

        proc = psutil.Process().parent()
        while proc is not None and proc.pid > 1:
            cmd = proc.cmdline()
            names = [Path(c).name for c in cmd[:3]]
            if "dvc" in names:
                i = names.index("dvc")
                if set(cmd[i + 1 : i + 3]) & {"repro", "exp", "experiments"}:
                    key = f"{socket.gethostname()}:{proc.pid}:{int(proc.create_time())}"
                    return key, " ".join(["dvc", *cmd[i + 1 :]])
            proc = proc.parent()
    except Exception:  # noqa: BLE001 - no psutil, a vanished process, no permission: no implicit parent
        return None
    return None


def dvc_parent(client: Any, exp_id: str, cfg: Any) -> str | None:
    """The parent run of the DVC invocation that launched this stage, or None: the first stage of an invocation opens
    it (keyed by :func:`dvc_invocation`), the next ones find it by that key and set it RUNNING again (each stage
    closes it when it ends: nobody knows which stage is the last)."""
    inv = dvc_invocation()
    if inv is None:
        return None
    key, desc = inv
    found = client.search_runs([exp_id], filter_string=f"tags.`slotcon.dvc_invocation` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    root = Path(os.environ.get("DVC_ROOT") or os.getcwd())
    exp_name = os.environ.get(EXP_NAME_ENV) or None
    tags = {"slotcon.dvc_invocation": key, "mlflow.source.name": desc, "slotcon.driver": "dvc",
            OWNER_TAG: key}  # the parent lives as long as the dvc process, not the stage that opened it
    if exp_name:
        tags["dvc.experiment"] = exp_name
    return open_parent(client, exp_id, root, name=run_name(root, exp_name=exp_name), tags=tags,
                       uri=tracking_uri(cfg))


def close_dvc_parent(client: Any, parent: str, stage: str, status: str, metrics_files: list[str] | None,
                     uri: str) -> None:
    """After one stage of a ``dvc repro``: its headline metrics files onto the parent, then end the parent."""
    root = Path(os.environ.get("DVC_ROOT") or os.getcwd())
    dvc_stage = os.environ.get("DVC_STAGE", stage)
    if metrics_files is None:
        metrics_files = stage_metrics_files(root).get(dvc_stage.split(":")[-1], [])
    metrics = headline_metrics(root, {stage: metrics_files}) if status == "FINISHED" else {}
    close_parent(client, parent, root, metrics=metrics, status=status, uri=uri,
                 tags={"slotcon.last_stage": stage, "slotcon.ended": str(int(time.time()))})
