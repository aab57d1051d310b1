"""Faults in the operations layer: the DVC cache, the MLflow store, params.yaml.

Each test injects one fault with the real tool (DVC with this repo's .dvc/config, a real SQLite MLflow store locked
by another process / damaged / made immutable, real YAML) and asserts what the product promises: workspace damage
never reaches the cache, an unusable store is one line naming the URI and the fix before any work, a store that
fails mid-run never stops the run and catches up, params holes are one-line errors with line and column.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLOTCON_", "MLFLOW_TRACKING"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1", PYTHONPATH=str(REPO_ROOT),
               MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    return env


# --------------------------------------------------------------------------------------------------------------------
# 11.3: damage in the workspace must not reach the DVC cache
# --------------------------------------------------------------------------------------------------------------------
SHARD_STAGE = textwrap.dedent(
    """
    import hashlib, json, pathlib
    out = pathlib.Path("shards"); out.mkdir(exist_ok=True)
    index = {}
    for i in range(3):
        data = bytes((i * 7 + j) % 251 for j in range(20000))
        (out / f"s-{i}.tar").write_bytes(data)
        index[f"s-{i}.tar"] = hashlib.sha1(data).hexdigest()
    (out / "index.json").write_text(json.dumps(index))
    """
)


def _verified(root: Path) -> bool:
    index = json.loads((root / "shards" / "index.json").read_text())
    return all(hashlib.sha1((root / "shards" / n).read_bytes()).hexdigest() == h for n, h in index.items())


def _damage(path: Path) -> None:
    """What a careless tool does: open the workspace file for writing and truncate it in place."""
    os.chmod(path, 0o644)  # DVC's read-only bit on linked files stops nobody who chmods (and never root)
    with open(path, "r+b") as fh:
        fh.truncate(1000)


def test_workspace_damage_never_reaches_the_dvc_cache(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    env = _env()
    (root / "make_shards.py").write_text(SHARD_STAGE)
    (root / "dvc.yaml").write_text("stages:\n  shard:\n    cmd: python make_shards.py\n    deps: [make_shards.py]\n"
                                   "    outs: [shards]\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True)
    shutil.copy2(REPO_ROOT / ".dvc" / "config", root / ".dvc" / "config")  # this repo's cache set-up
    subprocess.run(["dvc", "repro"], cwd=root, env=env, check=True, capture_output=True)
    assert _verified(root)

    _damage(root / "shards" / "s-1.tar")
    assert not _verified(root)
    out = subprocess.run(["dvc", "checkout", "--force"], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert _verified(root), "dvc checkout restored a damaged shard: the damage reached the cache"

    _damage(root / "shards" / "s-2.tar")
    out = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert _verified(root), "dvc repro left a damaged shard"
    status = subprocess.run(["dvc", "status"], cwd=root, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout


# --------------------------------------------------------------------------------------------------------------------
# 11.4: MLflow store trouble
# --------------------------------------------------------------------------------------------------------------------
LOCKER = textwrap.dedent(
    """
    import sqlite3, sys, time
    con = sqlite3.connect(sys.argv[1], isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    con.execute("COMMIT")
    """
)


def _hold_lock(db: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _params(tmp_path: Path, **edits: str) -> Path:
    text = (REPO_ROOT / "params.yaml").read_text()
    for old, new in edits.items():
        text = text.replace(old, new)
    p = tmp_path / "params.yaml"
    p.write_text(text.replace("artifact_location: mlartifacts", f"artifact_location: {tmp_path / 'art'}"))
    return p


def _scenes_cli(tmp_path: Path, capsys) -> tuple[int, str]:
    """`slotcon scenes` in-process on the tiny defaults; returns (exit status, stderr)."""
    from components.cli import main

    p = _params(tmp_path, **{"num_train: 192": "num_train: 2", "num_val: 48": "num_val: 1"})
    rc = main(["scenes", "--params", str(p), "--out", str(tmp_path / "scenes"),
               "--metrics", str(tmp_path / "m.json")])
    return rc, capsys.readouterr().err


def _fresh_store(tmp_path: Path) -> tuple[Path, str]:
    from components.config import TrackingConfig
    from components.tracking import open_store

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    open_store(TrackingConfig(experiment="slotcon-pipeline", artifact_location=str(tmp_path / "art")))
    return db, uri


@pytest.mark.parametrize("damage", ["garbage", "immutable", "locked"])
def test_unusable_store_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("SLOTCON_TRACKING_WAIT_S", "2")
    monkeypatch.delenv("SLOTCON_PARENT_RUN_ID", raising=False)
    db = tmp_path / "mlflow.db"
    holder = None
    if damage == "garbage":
        db.write_bytes(b"this is not an sqlite database " * 64)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    else:
        _fresh_store(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        if damage == "immutable":
            if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
                pytest.skip("chattr +i not available here")
        else:
            holder = _hold_lock(db, 30)
    try:
        t0 = time.monotonic()
        rc, err = _scenes_cli(tmp_path, capsys)
        took = time.monotonic() - t0
    finally:
        if damage == "immutable":
            subprocess.run(["chattr", "-i", str(db)])
        if holder is not None:
            holder.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert f"sqlite:///{db}" in lines[0] and "tracking.enabled: false" in lines[0], lines[0]
    assert not (tmp_path / "scenes").exists(), "work started before the store was checked"
    assert took < 90, f"{took:.1f} s to report an unusable store"  # (imports dominate on a loaded CI box)


def test_store_trouble_mid_run_never_stops_the_stage_and_catches_up(tmp_path, monkeypatch, capsys):
    """Locked (MLflow's SQLite store waits 20 s per call on a lock) and then unwritable (immutable file: every write
    fails at once) while a training loop logs: the loop is never held, never raises, warns once, and every figure
    reaches the store in order once it is back."""
    from mlflow import MlflowClient

    from components.config import TrackingConfig
    from components.tracking import stage_run

    monkeypatch.delenv("SLOTCON_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("SLOTCON_TRACKING_FLUSH_S", "90")
    db, uri = _fresh_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = TrackingConfig(experiment="slotcon-pipeline", artifact_location=str(tmp_path / "art"))
    immutable = False
    with stage_run("pretrain", {"epochs": 1}, cfg, rank=0) as tracker:
        tracker.log_metrics({"loss": 10.0}, step=0)
        holder = _hold_lock(db, 6)
        t0 = time.monotonic()
        for step in range(1, 4):  # a training loop logging while the store is locked
            tracker.log_metrics({"loss": 10.0 - step}, step=step)
            (tmp_path / f"ckpt-{step}.pt").write_text("checkpoint")  # the stage's own files go on
        blocked = time.monotonic() - t0
        assert tracker.pending > 0
        holder.wait(timeout=30)
        tracker.flush(60)
        if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode == 0:
            immutable = True
            try:
                for step in range(4, 6):
                    tracker.log_metrics({"loss": 10.0 - step}, step=step)
                deadline = time.monotonic() + 30
                while tracker.failures == 0 and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert tracker.failures > 0 and tracker.pending > 0
            finally:
                subprocess.run(["chattr", "-i", str(db)])
        else:
            for step in range(4, 6):
                tracker.log_metrics({"loss": 10.0 - step}, step=step)
        run_id = tracker.run_id
    err = capsys.readouterr().err
    assert blocked < 3, f"the loop was held {blocked:.1f} s by the locked store"
    if immutable:
        assert err.count("is unavailable") == 1 and "is back" in err, err  # warned once, and told it caught up
    assert all((tmp_path / f"ckpt-{s}.pt").is_file() for s in range(1, 4))
    client = MlflowClient(uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(s, 10.0 - s) for s in range(6)], history  # caught up, in order
    assert client.get_run(run_id).info.status == "FINISHED"


CREATOR = textwrap.dedent(
    """
    import os, sys, time
    from components.config import TrackingConfig
    from components.tracking import ensure_experiment
    start = float(sys.argv[1])
    time.sleep(max(0.0, start - time.time()))  # all processes hit the fresh store at the same moment
    ensure_experiment(TrackingConfig(experiment="slotcon-pipeline", artifact_location=sys.argv[2]))
    print("ok")
    """
)


@pytest.mark.slow
def test_concurrent_first_use_of_a_fresh_store_is_safe(tmp_path):
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    env = {**_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    # mlflow's import takes seconds on a loaded machine: aim past it so the four migrations really overlap
    start = time.time() + 20
    procs = [subprocess.Popen([sys.executable, "-c", CREATOR, str(start), str(tmp_path / "art")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=180) for p in procs]
    failures = [err[-800:] for p, (out, err) in zip(procs, outs) if p.returncode != 0]
    assert not failures, failures
    exps = [e.name for e in MlflowClient(f"sqlite:///{db}").search_experiments()]
    assert exps.count("slotcon-pipeline") == 1


# --------------------------------------------------------------------------------------------------------------------
# 11.6: params.yaml holes
# --------------------------------------------------------------------------------------------------------------------
def _check(p: Path, capsys) -> tuple[int, str]:
    from components.cli import main

    rc = main(["check", "--params", str(p)])
    return rc, capsys.readouterr().err.strip()


def test_empty_params_file_is_an_error(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    p.write_text("# nothing here\n")
    rc, err = _check(p, capsys)
    assert rc == 2 and err.count("\n") == 0 and "empty" in err and str(p) in err, err


def test_missing_section_fails_check_and_the_stage(tmp_path, capsys):
    text = (REPO_ROOT / "params.yaml").read_text()
    start = text.index("\nscenes:")
    end = text.index("\ndata:")
    p = tmp_path / "params.yaml"
    p.write_text(text[:start] + text[end:])
    rc, err = _check(p, capsys)
    assert rc == 2 and err.count("\n") == 0 and "section(s) scenes missing" in err, err
    from components.cli import main

    rc = main(["scenes", "--params", str(p), "--out", str(tmp_path / "scenes"), "--metrics", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "scenes missing" in err, err
    assert not (tmp_path / "scenes").exists()


def test_yaml_syntax_error_names_line_and_column(tmp_path, capsys):
    text = (REPO_ROOT / "params.yaml").read_text()
    lines = text.splitlines()
    n = next(i for i, ln in enumerate(lines) if ln.startswith("  epochs:"))
    lines[n] = "  epochs 3"  # the colon forgotten
    p = tmp_path / "params.yaml"
    p.write_text("\n".join(lines) + "\n")
    rc, err = _check(p, capsys)
    assert rc == 2 and err.count("\n") == 0, err
    assert f"{p}:{n + 2}:" in err or f"{p}:{n + 1}:" in err, err  # PyYAML reports the next key's line


def test_scientific_notation_is_a_number(tmp_path, capsys):
    p = _params(tmp_path, **{"min_lr: 1.0e-6": "min_lr: 1e-6"})
    rc, err = _check(p, capsys)
    assert rc == 0, err
    from components.config import load_section

    assert load_section("pretrain", p).slotcon.min_lr == 1e-6


def test_duplicated_key_is_an_error(tmp_path, capsys):
    text = (REPO_ROOT / "params.yaml").read_text().replace("  epochs: 3 ", "  epochs: 3\n  epochs: 5 ", 1)
    p = tmp_path / "params.yaml"
    p.write_text(text)
    rc, err = _check(p, capsys)
    assert rc == 2 and err.count("\n") == 0 and "duplicate key 'epochs'" in err, err
