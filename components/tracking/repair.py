"""What an interrupted run leaves in the store, put right at the next stage's start: runs still RUNNING whose process
is gone are closed as KILLED, and registered versions an interrupted ``slotcon export`` left half-made are removed.

A run knows its process by the tag ``slotcon.owner`` (host:pid:start time, set when the run is created), so only
runs of this machine whose process no longer exists are touched; a run of another host is left alone.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

import psutil

from components.tracking.store import first_line

OWNER_TAG = "slotcon.owner"
COMPLETE_TAG = "slotcon.checkpoint_md5"  # the last tag export sets on a version (then @candidate): none = cut off
CANDIDATE = "candidate"  # the alias of the newest exported version


def owner_key(pid: int | None = None) -> str:
    """``host:pid:start time`` of this process (or ``pid``)."""
    proc = psutil.Process(pid or os.getpid())
    return f"{socket.gethostname()}:{proc.pid}:{int(proc.create_time())}"


def owner_gone(key: str) -> bool:
    """The process named by ``key`` ran on this host and no longer exists (a reused pid has another start time)."""
    try:
        host, pid, started = key.rsplit(":", 2)
        if host != socket.gethostname():
            return False
        return int(psutil.Process(int(pid)).create_time()) != int(started)
    except psutil.NoSuchProcess:
        return True
    except (ValueError, psutil.Error):
        return False


def close_stale_runs(client: Any, exp_id: str) -> list[str]:
    """Set KILLED every RUNNING run of ``exp_id`` whose owner process (or DVC invocation) is gone."""
    closed = []
    for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=500):
        key = run.data.tags.get(OWNER_TAG) or run.data.tags.get("slotcon.dvc_invocation")
        if key and owner_gone(key):
            client.set_terminated(run.info.run_id, status="KILLED", end_time=int(time.time() * 1000))
            closed.append(run.info.run_id)
    return closed


def remove_cut_registrations(client: Any, model_prefix: str) -> list[str]:
    """Delete versions of ``model_prefix*`` without :data:`COMPLETE_TAG` whose run has ended (or was killed): the
    backbone file is the stage's output, so a re-run of export registers it again, whole. A version cut off after
    its tags but before its alias is completed: ``@candidate`` moves to the newest whole version."""
    removed = []
    for model in client.search_registered_models(filter_string=f"name LIKE '{model_prefix}%'"):
        whole = []
        for v in client.search_model_versions(f"name = '{model.name}'"):
            if COMPLETE_TAG in (v.tags or {}) or not v.run_id:
                whole.append(int(v.version))
                continue
            if client.get_run(v.run_id).info.status == "RUNNING":
                continue  # an export registering right now
            client.delete_model_version(model.name, v.version)
            removed.append(f"{model.name}/{v.version}")
        aliases = dict(getattr(model, "aliases", None) or {})
        if whole and int(aliases.get(CANDIDATE) or 0) < max(whole):
            client.set_registered_model_alias(model.name, CANDIDATE, str(max(whole)))
    return removed


def repair(client: Any, exp_id: str, registered_model: str) -> None:
    """Both repairs; a store that can't do them now only gets a warning (they run again at the next start)."""
    try:
        closed = close_stale_runs(client, exp_id)
        removed = remove_cut_registrations(client, registered_model)
    except Exception as exc:  # noqa: BLE001 - housekeeping never stops a stage
        print(f"slotcon: warning: MLflow housekeeping skipped ({first_line(exc)})", file=sys.stderr)
        return
    if closed or removed:
        print(f"slotcon: MLflow: {len(closed)} stale RUNNING run(s) closed as KILLED, {len(removed)} half-made "
              f"registered version(s) removed ({', '.join(removed) or '-'})", file=sys.stderr)
