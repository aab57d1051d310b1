"""``slotcon stack up | down | status``: the team stack on this machine (see :mod:`components.stack.services`).

``up`` starts what is not running (idempotent), writes the env file a user sources and points the repository's DVC
remote (``.dvc/config.local``, so the committed config stays as it is) at the bucket. ``down`` stops, by PID, what
``up`` started and keeps the data. ``status`` prints one line per server; exit status 0 only when all run.
"""
from __future__ import annotations

import argparse
import shlex
import time

from components.errors import UserError
from components.io import write_text_atomic
from components.stack import procs, services
from components.stack.settings import StackSettings, add_arguments as add_settings, from_args

DVC_REMOTE = "stack"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("up", "down", "status"), help="start, stop or list the stack's servers")
    add_settings(parser)
    parser.add_argument("--no-dvc", action="store_true", help="up: leave the repository's DVC remote alone")


def write_env(s: StackSettings) -> None:
    lines = ["# written by `slotcon stack up`: `source` it (or `set -a; . FILE; set +a`) before make demo / dvc push"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in s.client_env().items()]
    write_text_atomic(s.env_file, "\n".join(lines) + "\n")
    s.env_file.chmod(0o600)  # it holds the S3 secret


def configure_dvc(s: StackSettings) -> str:
    """The stack's bucket as the repository's default DVC remote, in ``.dvc/config.local`` (never committed)."""
    dvc_dir = s.repo / ".dvc"
    if not dvc_dir.is_dir():
        return f"no DVC repository at {s.repo}: remote not set"
    from dvc.config import Config  # lazy: dvc costs ~1 s to import

    env = s.s3_env()
    with Config(str(dvc_dir)).edit("local") as conf:
        conf["remote"][DVC_REMOTE] = {"url": f"s3://{s.bucket}/dvc", "endpointurl": s.url("s3"),
                                      "access_key_id": env["AWS_ACCESS_KEY_ID"],
                                      "secret_access_key": env["AWS_SECRET_ACCESS_KEY"], "region": "us-east-1"}
        conf["core"]["remote"] = DVC_REMOTE
    return f"DVC remote '{DVC_REMOTE}' -> s3://{s.bucket}/dvc (in {dvc_dir / 'config.local'})"


def up(s: StackSettings, dvc: bool = True) -> None:
    t0 = time.monotonic()
    s.dir.mkdir(parents=True, exist_ok=True)
    records = procs.load(s.dir)
    for svc in services.SERVICES:
        print(f"stack: {svc.name:<8} {services.start(svc, s, records)}", flush=True)
    write_env(s)
    print(f"stack: env file {s.env_file} (source it)")
    if dvc:
        print(f"stack: {configure_dvc(s)}")
    for line in status_lines(s):
        print(line)
    print(f"stack: up in {time.monotonic() - t0:.1f} s")


def down(s: StackSettings) -> None:
    records = procs.load(s.dir)
    for svc in reversed(services.SERVICES):
        rec = records.get(svc.name)
        if rec is None:
            continue
        was, t0 = procs.alive(rec), time.monotonic()
        procs.stop(rec, sig=svc.stop_signal, wait_s=svc.stop_wait_s)
        records.pop(svc.name)
        procs.save(s.dir, records)
        print(f"stack: {svc.name:<8} {'stopped' if was else 'was not running'} (pid {rec['pid']}, "
              f"{time.monotonic() - t0:.1f} s)")
    print(f"stack: down; data kept in {s.dir}")


def status_lines(s: StackSettings) -> list[str]:
    records = procs.load(s.dir)
    urls = {"postgres": s.pg_uri("<db>"), "s3": f"{s.url('s3')} bucket {s.bucket}", "mlflow": s.url("mlflow"),
            "prefect": s.url("prefect", "/api"), "worker": f"pool {services.POOL}"}
    out = []
    for svc in services.SERVICES:
        rec = records.get(svc.name)
        state = f"running (pid {rec['pid']})" if procs.alive(rec) else ("stale record" if rec else "stopped")
        out.append(f"stack: {svc.name:<8} {state:<22} {urls[svc.name]}")
    return out


def all_running(s: StackSettings) -> bool:
    records = procs.load(s.dir)
    return all(procs.alive(records.get(svc.name)) for svc in services.SERVICES)


def main(args: argparse.Namespace) -> int:
    s = from_args(args)
    if args.action == "up":
        try:
            up(s, dvc=not args.no_dvc)
        except UserError:
            raise
        except ImportError as exc:
            raise UserError(f"stack: {exc.name} is missing: pip install -e '.[stack]'") from None
        return 0
    if args.action == "down":
        down(s)
        return 0
    for line in status_lines(s):
        print(line)
    return 0 if all_running(s) else 1
