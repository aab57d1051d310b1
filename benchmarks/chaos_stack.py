"""The chaos campaign's fault on a real MLflow tracking server: the team stack (``slotcon stack up``) started once in
the campaign's folder on free ports; a pretraining run tracked through it while the server is SIGKILLed and started
again. The run must finish, write its metrics file, and its MLflow run must end FINISHED with its final metrics."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class StackServer:
    """A stack in ``folder`` for the campaign: ``up`` (idempotent), ``down``, the client env, the MLflow server's pid."""

    def __init__(self, folder: Path, rng: random.Random):
        from components.stack.procs import free_ports
        from components.stack.settings import PORTS

        self.dir, self.env_file = folder / "stack", folder / "stack.env"
        self.ports = free_ports(list(PORTS), rng)

    def cli(self, action: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "components", "stack", action, "--dir", str(self.dir), "--env-file",
               str(self.env_file), *(["--no-dvc"] if action == "up" else []),
               *[f"--{k}-port={v}" for k, v in self.ports.items()]]
        return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                              text=True, timeout=600)

    def env(self) -> dict[str, str]:
        return {k[len("export "):]: v.strip("'") for k, _, v in
                (line.partition("=") for line in self.env_file.read_text().splitlines() if line.startswith("export "))}

    def kill_mlflow(self) -> None:
        os.killpg(json.loads((self.dir / "pids.json").read_text())["mlflow"]["pid"], signal.SIGKILL)


def tracking_server_kill(camp, n: int) -> dict:
    """One round: pretraining tracked through the stack's MLflow server, which is killed at a random moment and
    started again 2-6 s later."""
    from mlflow import MlflowClient

    if getattr(camp, "stack", None) is None:
        camp.stack = StackServer(camp.work, camp.rng)
        up = camp.stack.cli("up")
        if up.returncode:
            camp.stack = None
            raise RuntimeError(f"slotcon stack up failed: {up.stderr.strip()[-300:]}")
    stack, out = camp.stack, camp.work / f"server_{n}"
    out.mkdir()
    params = camp.params_file(out / "params.yaml", tracking=True, server=True)
    env = {**camp.env(), **stack.env(), "SLOTCON_EXPERIMENT": f"chaos-{n}"}
    proc = subprocess.Popen(camp.pretrain_cmd(out, params), cwd=camp.work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    delay, down = camp.rng.uniform(0.2, 0.7) * camp.pretrain_s, camp.rng.uniform(2, 6)

    def fault() -> None:
        time.sleep(delay)
        stack.kill_mlflow()
        time.sleep(down)
        stack.cli("up")

    th = threading.Thread(target=fault)
    th.start()
    text, _ = proc.communicate(timeout=900)
    th.join()
    ok = proc.returncode == 0 and (out / "metrics.json").is_file()
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(f"chaos-{n}")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    logged = any(r.info.status == "FINISHED" and "final_loss" in r.data.metrics for r in runs)
    return {"killed_after_s": round(delay, 1), "down_s": round(down, 1), "exit": proc.returncode,
            "mlflow_caught_up": logged, "recovered": ok and logged, **({} if ok else {"tail": text[-300:]})}
