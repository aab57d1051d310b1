"""Detached server processes recorded by PID: start one (own session, log file), tell whether it still runs (PID and
start time, so a reused PID is never taken for ours), stop it, wait until it answers.

The record is ``<stack dir>/pids.json`` (written atomically); ``down`` stops only what it lists.
"""
from __future__ import annotations

import json
import os
import pwd
import signal
import random
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Mapping, Sequence

import psutil

from components.errors import UserError
from components.io import write_json_atomic


def _records_path(sdir: Path) -> Path:
    return sdir / "pids.json"


def load(sdir: Path) -> dict[str, dict]:
    path = _records_path(sdir)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"stack: {path} is not JSON: stop stray servers by hand (ps), then delete it") from None


def save(sdir: Path, records: Mapping[str, dict]) -> None:
    write_json_atomic(_records_path(sdir), dict(records))


def alive(rec: Mapping | None) -> bool:
    """The recorded process still runs (same PID and start time, not a zombie)."""
    if not rec:
        return False
    try:
        proc = psutil.Process(int(rec["pid"]))
        return abs(proc.create_time() - float(rec["started"])) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, ValueError):
        return False


def port_busy(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) == 0


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(names: Sequence[str], rng: random.Random | None = None) -> dict[str, int]:
    """A port free on 127.0.0.1 just now for each of ``names`` (7 in a row for SeaweedFS's internals, ``weed``):
    a stack for tests or a chaos campaign beside the default one."""
    rng = rng or random.Random()
    out: dict[str, int] = {}
    for name in names:
        span = 7 if name == "weed" else 1
        while True:
            base = rng.randrange(20000, 60000)
            taken = {p + i for p in out.values() for i in range(7)}
            if all(_bindable(base + i) and base + i not in taken for i in range(span)):
                out[name] = base
                break
    return out


def start(name: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None,
          user: int | None = None) -> dict:
    """Start ``argv`` in its own session (it outlives ``slotcon stack up``), output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
                                user=user, group=None if user is None else _gid(user))
    return {"pid": proc.pid, "started": psutil.Process(proc.pid).create_time(), "argv": list(argv), "log": str(log)}


def _gid(uid: int) -> int:
    return pwd.getpwuid(uid).pw_gid


def stop(rec: Mapping, sig: int = signal.SIGTERM, wait_s: float = 20.0) -> None:
    """Signal the process (and its session's group), wait up to ``wait_s``, then kill what is left."""
    if not alive(rec):
        return
    pid = int(rec["pid"])
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return
    os.kill(pid, sig)
    _, left = psutil.wait_procs(procs[:1], timeout=wait_s)
    for p in procs[1:] + left:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(procs, timeout=5)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until(what: str, ready: Callable[[], bool], rec: Mapping, timeout_s: float) -> None:
    """Poll ``ready()`` until true; the process dying or ``timeout_s`` passing is a one-line error naming its log."""
    t0 = time.monotonic()
    while not ready():
        if not alive(rec):
            raise UserError(f"stack: {what} exited while starting: see {rec['log']} (last line: {_tail(rec)})")
        if time.monotonic() - t0 > timeout_s:
            raise UserError(f"stack: {what} did not answer within {timeout_s:.0f} s: see {rec['log']}")
        time.sleep(0.3)


def _tail(rec: Mapping) -> str:
    try:
        lines = [ln for ln in Path(rec["log"]).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "?"
    return lines[-1][:200] if lines else "(empty)"
