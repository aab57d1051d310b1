"""Where the stack lives and which ports it uses: flags, else ``SLOTCON_STACK_*`` environment variables, else defaults.

Everything binds to 127.0.0.1 unless ``--host`` says otherwise. The S3 keys are made once per data folder and kept
there (mode 0600), so ``up`` after ``down`` serves the same bucket with the same keys.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from components.errors import UserError
from components.io import write_text_atomic

# name -> (default port, help): each is also settable as --<name>-port or $SLOTCON_STACK_<NAME>_PORT
PORTS: dict[str, tuple[int, str]] = {
    "pg": (15432, "PostgreSQL"),
    "s3": (18333, "the S3 gateway (SeaweedFS)"),
    "mlflow": (15000, "the MLflow tracking server"),
    "prefect": (14200, "the Prefect server (API under /api)"),
    "weed": (19330, "first of 7 consecutive SeaweedFS-internal ports (master, volume, filer and their gRPC)"),
}
# name -> (Prefect setting, help): each is also settable as --<name>-s or $SLOTCON_STACK_<NAME>_S; unset = Prefect's
# default (60 s and 10 s), what a lab wants; tests set a few seconds so a schedule fires within seconds
INTERVALS: dict[str, tuple[str, str]] = {
    "scheduler_loop": ("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS",
                       "how often the Prefect server's scheduler creates the flow runs of schedules"),
    "worker_poll": ("PREFECT_WORKER_QUERY_SECONDS", "how often the worker asks its pool for flow runs to start"),
}
POOL = "slotcon-process"  # the work pool prefect.yaml's deployments name
ACCESS_KEY = "slotcon"


def _env(name: str, default: str) -> str:
    return os.environ.get(f"SLOTCON_STACK_{name.upper()}", default)


@dataclass
class StackSettings:
    """One stack: its data folder, the env file it writes, the bind host and the ports."""

    dir: Path
    env_file: Path
    repo: Path
    host: str = "127.0.0.1"
    bucket: str = "slotcon"
    ports: dict[str, int] = field(default_factory=lambda: {k: v[0] for k, v in PORTS.items()})
    intervals: dict[str, float] = field(default_factory=dict)  # INTERVALS name -> seconds; absent = Prefect's own

    def interval_env(self, name: str) -> dict[str, str]:
        """The Prefect setting of interval ``name`` for a server's environment (empty: Prefect's default)."""
        return {INTERVALS[name][0]: f"{self.intervals[name]:g}"} if name in self.intervals else {}

    @property
    def advertise(self) -> str:
        """The host clients use in URLs (the bind host, or this machine's name when bound to every interface)."""
        return os.uname().nodename if self.host in ("0.0.0.0", "::") else self.host

    def url(self, name: str, path: str = "") -> str:
        return f"http://{self.advertise}:{self.ports[name]}{path}"

    def pg_uri(self, db: str, driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://postgres@{self.advertise}:{self.ports['pg']}/{db}"

    def secret_key(self) -> str:
        """The S3 secret key of this data folder (made on first use)."""
        path = self.dir / "s3-secret"
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, secrets.token_hex(20))
            path.chmod(0o600)
        return path.read_text().strip()

    def s3_identities(self) -> Path:
        """SeaweedFS's S3 identities file: one identity with every action on every bucket."""
        path = self.dir / "s3-identities.json"
        ident = {"identities": [{"name": ACCESS_KEY, "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                                 "credentials": [{"accessKey": ACCESS_KEY, "secretKey": self.secret_key()}]}]}
        write_text_atomic(path, json.dumps(ident, indent=2))
        path.chmod(0o600)
        return path

    def s3_env(self) -> dict[str, str]:
        """What an S3 client (boto3, s3fs, DVC) needs to reach the bucket."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": self.secret_key(),
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": self.url("s3"),
                "MLFLOW_S3_ENDPOINT_URL": self.url("s3")}

    def client_env(self) -> dict[str, str]:
        """The settings a user sources (``.slotcon/stack.env``): tracking, orchestration, DVC remote, S3."""
        return {"MLFLOW_TRACKING_URI": self.url("mlflow"), "PREFECT_API_URL": self.url("prefect", "/api"),
                "SLOTCON_WORK_POOL": POOL, "SLOTCON_DVC_REMOTE": f"s3://{self.bucket}/dvc",
                "SLOTCON_S3_ENDPOINT": self.url("s3"), **self.s3_env()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=None, help="data folder (default .slotcon/stack; $SLOTCON_STACK_DIR)")
    parser.add_argument("--env-file", default=None,
                        help="env file written by up (default .slotcon/stack.env; $SLOTCON_STACK_ENV_FILE)")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1; $SLOTCON_STACK_HOST)")
    parser.add_argument("--bucket", default=None, help="S3 bucket (default slotcon; $SLOTCON_STACK_BUCKET)")
    for name, (default, what) in PORTS.items():
        parser.add_argument(f"--{name}-port", type=int, default=None,
                            help=f"port of {what} (default {default}; $SLOTCON_STACK_{name.upper()}_PORT)")
    for name, (setting, what) in INTERVALS.items():
        parser.add_argument(f"--{name.replace('_', '-')}-s", type=float, default=None,
                            help=f"seconds: {what} (default Prefect's {setting}; $SLOTCON_STACK_{name.upper()}_S)")


def _intervals(args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for name in INTERVALS:
        raw = getattr(args, f"{name}_s", None)
        raw = raw if raw is not None else os.environ.get(f"SLOTCON_STACK_{name.upper()}_S", "")
        if raw == "":
            continue
        flag = f"--{name.replace('_', '-')}-s / $SLOTCON_STACK_{name.upper()}_S"
        try:
            seconds = float(raw)
        except ValueError:
            raise UserError(f"stack: {name.replace('_', ' ')} {raw!r} is not a number of seconds ({flag})") from None
        if not 0.5 <= seconds <= 86400:
            raise UserError(f"stack: {name.replace('_', ' ')} {seconds:g} s is outside 0.5-86400 s ({flag})")
        out[name] = seconds
    return out


def from_args(args: argparse.Namespace, repo: Path | None = None) -> StackSettings:
    """Settings from parsed flags, then the environment, then defaults; a bad port is a one-line error."""
    repo = (repo or Path.cwd()).resolve()
    sdir = Path(args.dir or _env("dir", ".slotcon/stack"))
    env_file = Path(args.env_file or _env("env_file", ".slotcon/stack.env"))
    ports = {}
    for name, (default, _) in PORTS.items():
        raw = getattr(args, f"{name}_port", None) or _env(f"{name}_port", str(default))
        try:
            port = int(raw)
        except ValueError:
            raise UserError(f"stack: port {raw!r} for {name} is not a number (--{name}-port / "
                            f"$SLOTCON_STACK_{name.upper()}_PORT)") from None
        top = 65535 - 6 if name == "weed" else 65535
        if not 1024 <= port <= top:
            raise UserError(f"stack: port {port} for {name} is outside 1024-{top} (--{name}-port)")
        ports[name] = port
    return StackSettings(dir=(repo / sdir).resolve(), env_file=(repo / env_file).resolve(), repo=repo,
                         host=args.host or _env("host", "127.0.0.1"), bucket=args.bucket or _env("bucket", "slotcon"),
                         ports=ports, intervals=_intervals(args))
