"""A bounded, randomized fault campaign: kill stages at random moments, damage shards and checkpoints, lock the MLflow
store -- then check that every run recovers and every lost sample is counted. Prints the figures.

Fault kinds (one drawn per round, from ``--seed``):

- ``shard_kill``: ``slotcon shard`` SIGKILLed after a random delay, then re-run: the shards must be byte-identical to
  an uninterrupted run's and pass ``--verify``.
- ``pretrain_kill``: ``slotcon pretrain`` SIGKILLed at a random moment, then re-run: the final weights must equal an
  uninterrupted run's (CPU: exactly).
- ``checkpoint_damage``: as ``pretrain_kill``, and the newest checkpoint is truncated or has bytes flipped before the
  re-run: it must be skipped for the previous one, and the final weights must still equal the uninterrupted run's.
- ``shard_damage``: random bytes overwritten, or a cut at a random offset, in a copy of one shard; then one pass of the
  loader with the expected counts: samples it reports lost or skipped vs samples it really did not deliver.
- ``shard_swap``: one shard of a copy replaced by a copy of another, a member renamed, or a foreign sample appended;
  then one pass of the loader: every sample it delivers must be a genuine one of its shard (never one twice), and the
  samples it did not deliver must all be counted lost.
- ``annotation_damage``: random faults (NaN coordinates, a short polygon, an RLE claiming a huge size, a negative box)
  written into a copy of the scenes' COCO annotations, then ``prepare`` and ``shard``: prepare must count exactly the
  damaged annotations in ``annotations_skipped`` and the shards must hold none of them.
- ``tracking_server_kill`` (needs ``.[stack]``): a pretraining run tracked through the stack's MLflow server (started
  once per campaign on free ports), which is SIGKILLed at a random moment and started again 2-6 s later: the run must
  finish and its MLflow run must end FINISHED with its final metrics.
- ``store_lock``: a second process holds an exclusive lock on ``mlflow.db`` for a random 5-20 s during a pretraining
  run: the run must finish, write its metrics file, and its MLflow run must end with its final metrics.

    python benchmarks/chaos.py                    # 10 rounds, about 10 minutes on a 2-core CPU
    python benchmarks/chaos.py --rounds 30 --seed 3 --kinds shard_damage,pretrain_kill
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import chaos_stack  # noqa: E402  (benchmarks/chaos_stack.py: the fault on a real MLflow server)

KINDS = ("shard_kill", "pretrain_kill", "checkpoint_damage", "shard_damage", "shard_swap", "annotation_damage",
         "store_lock", "tracking_server_kill")
TINY = {
    "tracking": {"enabled": False},
    "scenes": {"num_train": 48, "num_val": 8, "image_size": 64, "workers": 1},
    "data": {"workers": 1},
    "shard": {"max_count": 8, "workers": 2, "verify": False},
    "pretrain": {"image_size": 64, "batch_size": 8, "epochs": 2, "num_workers": 0,
                 "log_every_steps": 1, "save_every_steps": 2, "samples_per_epoch": 32,
                 "slotcon": {"num_prototypes": 8, "dim_hidden": 32, "dim_out": 16, "warmup_epochs": 1}},
}


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true",
               DO_NOT_TRACK="1", TQDM_DISABLE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("SLOTCON_PARENT_RUN_ID", None)
    return env


def _params(path: Path, tracking: bool = False, server: bool = False) -> Path:
    import yaml

    from components.config import SECTIONS

    data = {name: {} for name in SECTIONS}
    for k, v in TINY.items():
        data[k] = v
    if tracking and server:  # MLFLOW_TRACKING_URI (the stack's server) decides where runs and artifacts go
        data["tracking"] = {"enabled": True}
    elif tracking:
        data["tracking"] = {"enabled": True, "tracking_uri": f"sqlite:///{path.parent / 'mlflow.db'}",
                            "artifact_location": str(path.parent / "mlartifacts")}
    path.write_text(yaml.safe_dump(data))
    return path


def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _kill_after(cmd: list[str], cwd: Path, delay: float) -> bool:
    """Start ``cmd``, SIGKILL it (and its children) after ``delay`` s; True if it was still running then."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def _sha1s(folder: Path) -> dict[str, str]:
    from components.io import sha1_file

    return {str(p.relative_to(folder)): sha1_file(p) for p in sorted(folder.rglob("*.tar"))}


def _weights_equal(a: Path, b: Path) -> float:
    import torch

    sa, sb = torch.load(a, weights_only=True)["model"], torch.load(b, weights_only=True)["model"]
    return max(float((sa[k].float() - sb[k].float()).abs().max()) if sa[k].numel() else 0.0 for k in sa)


def _tar_keys(path: Path) -> set[str]:
    import tarfile

    with tarfile.open(path) as tf:
        return {ti.name.split(".", 1)[0] for ti in tf}


def _annotation_ids(shards: Path) -> set[int]:
    """Every annotation id the shards' sample metadata holds."""
    import tarfile

    ids: set[int] = set()
    for tar in shards.rglob("*.tar"):
        with tarfile.open(tar) as tf:
            for ti in tf:
                if ti.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(ti).read())
                    ids.update(a["id"] for a in meta.get("annotations", []) if "id" in a)
    return ids


class Campaign:
    def __init__(self, work: Path, rng: random.Random):
        self.work, self.rng = work, rng
        self.results: list[dict] = []

    # ---- references --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from components.config import DataConfig, ScenesConfig, ShardConfig
        from components.data.prepare.stage import run_prepare
        from components.data.scenes.stage import generate_scenes
        from components.data.shards.stage import run_shard

        w = self.work
        generate_scenes(ScenesConfig(**TINY["scenes"]), w / "scenes")
        run_prepare(DataConfig(workers=1), w / "scenes", w / "raw", progress=False)
        run_shard(ShardConfig(max_count=8, workers=2), w / "raw", w / "shards", progress=False)
        self.ref_shards = _sha1s(w / "shards")
        self.params = _params(w / "params.yaml")
        out = _run(self._pretrain_cmd(w / "ref"), w)
        if out.returncode:
            raise SystemExit(f"chaos: the reference pretraining failed:\n{out.stderr[-2000:]}")
        self.ref_model = w / "ref" / "models" / "last.pt"
        t0 = time.perf_counter()
        _run(self._pretrain_cmd(w / "timing"), w)
        self.pretrain_s = time.perf_counter() - t0

    # what benchmarks/chaos_stack.py's fault uses of a campaign
    params_file, env = staticmethod(_params), staticmethod(_env)

    def pretrain_cmd(self, out: Path, params: Path | None = None) -> list[str]:
        return self._pretrain_cmd(out, params)

    def tracking_server_kill(self, n: int) -> dict:
        return chaos_stack.tracking_server_kill(self, n)

    def close(self) -> None:
        if getattr(self, "stack", None) is not None:
            self.stack.cli("down")

    def _pretrain_cmd(self, out: Path, params: Path | None = None) -> list[str]:
        return [sys.executable, "-m", "components", "pretrain", "--params", str(params or self.params), "--shards",
                str(self.work / "shards"), "--out", str(out / "models"), "--checkpoints", str(out / "ckpt"),
                "--metrics", str(out / "metrics.json"), "--plots", str(out / "plots")]

    # ---- faults ------------------------------------------------------------------------------------------------
    def shard_kill(self, n: int) -> dict:
        out = self.work / f"shards_{n}"
        cmd = [sys.executable, "-m", "components", "shard", "--params", str(self.params), "--raw",
               str(self.work / "raw"), "--out", str(out), "--no-progress"]
        killed = _kill_after(cmd, self.work, self.rng.uniform(0.5, 6.0))
        rerun = _run(cmd, self.work)
        verify = _run(cmd + ["--verify"], self.work)
        same = rerun.returncode == 0 and _sha1s(out) == self.ref_shards
        return {"killed": killed, "recovered": same and verify.returncode == 0}

    def pretrain_kill(self, n: int, damage: bool = False) -> dict:
        out = self.work / f"pre_{n}"
        killed = _kill_after(self._pretrain_cmd(out), self.work, self.rng.uniform(0.3, 1.0) * self.pretrain_s)
        damaged = None
        if damage:
            ckpts = sorted((out / "ckpt").rglob("step_*.pt"))
            if ckpts:
                damaged = ckpts[-1]
                data = bytearray(damaged.read_bytes())
                if self.rng.random() < 0.5:
                    data = data[: self.rng.randrange(1, len(data))]
                else:
                    for _ in range(16):
                        i = self.rng.randrange(len(data))
                        data[i] ^= 0xFF
                damaged.write_bytes(bytes(data))
        rerun = _run(self._pretrain_cmd(out), self.work)
        ok = rerun.returncode == 0 and (out / "models" / "last.pt").is_file()
        diff = _weights_equal(self.ref_model, out / "models" / "last.pt") if ok else float("inf")
        return {"killed": killed, "damaged_checkpoint": str(damaged) if damaged else None,
                "max_weight_diff": diff, "recovered": ok and diff <= 1e-6}

    def checkpoint_damage(self, n: int) -> dict:
        return self.pretrain_kill(n, damage=True)

    def _shards_copy(self, name: str) -> tuple[list[str], dict[str, int]]:
        """A copy of the campaign's shards under ``name``: the train split's shard URLs and expected counts."""
        from components.data.shards.stage import expected_counts, read_index, split_urls

        out = self.work / name
        shutil.copytree(self.work / "shards", out)
        split = read_index(out)["train"]
        return split_urls(out, split), expected_counts(out, split)

    def shard_damage(self, n: int) -> dict:
        from components.data.loading.loader import iterate_samples

        urls, expected = self._shards_copy(f"damaged_{n}")
        victim = Path(self.rng.choice(urls))
        data = bytearray(victim.read_bytes())
        if self.rng.random() < 0.5:
            cut = self.rng.randrange(0, len(data))
            data, how = data[:cut], f"cut at byte {cut} of {len(data)}"
        else:
            at = self.rng.randrange(0, len(data) - 8)
            width = self.rng.choice([1, 4, 64, 512])
            data[at:at + width] = bytes(self.rng.randrange(256) for _ in range(min(width, len(data) - at)))
            how = f"{width} random bytes at {at}"
        victim.write_bytes(bytes(data))
        it = iterate_samples(urls, decode="rgb", expected_counts=expected)
        delivered = sum(1 for _ in it)
        real = sum(expected.values()) - delivered
        counted = int(it.stats["lost"])  # every sample not delivered (a skipped corrupt one included), by shard
        return {"damage": f"{victim.name}: {how}", "lost_real": real, "lost_counted": counted,
                "recovered": counted == real}

    def shard_swap(self, n: int) -> dict:
        import tarfile

        from components.data.loading.loader import iterate_samples

        urls, expected = self._shards_copy(f"swapped_{n}")
        genuine = {u: _tar_keys(Path(u)) for u in urls}
        victim, other = self.rng.sample(urls, 2)
        how = self.rng.choice(["copy_of_other", "rename_member", "append_foreign"])
        if how == "copy_of_other":
            shutil.copyfile(other, victim)
        else:
            with tarfile.open(victim) as tf:
                members = [(ti, tf.extractfile(ti).read()) for ti in tf]
            if how == "rename_member":
                i = self.rng.randrange(len(members))
                members[i][0].name = "../../" + members[i][0].name
            else:
                with tarfile.open(other) as tf:
                    first = next(iter(tf))
                    members.append((first, tf.extractfile(first).read()))
            with tarfile.open(victim, "w") as tf:
                for ti, data in members:
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        it = iterate_samples(urls, decode="rgb", expected_counts=expected)
        delivered = [(s["url"], s["key"]) for s in it]
        foreign = [d for d in delivered if d[1] not in genuine.get(d[0], set())]
        twice = len(delivered) - len(set(delivered))
        real = sum(expected.values()) - (len(delivered) - len(foreign) - twice)
        counted = int(it.stats["lost"])
        return {"damage": f"{Path(victim).name}: {how}", "foreign_delivered": len(foreign), "delivered_twice": twice,
                "lost_real": real, "lost_counted": counted, "recovered": not foreign and not twice and counted == real}

    def annotation_damage(self, n: int) -> dict:
        from components.config import DataConfig, ShardConfig
        from components.data.prepare.stage import run_prepare
        from components.data.shards.stage import run_shard

        root = self.work / f"ann_{n}" / "scenes"
        shutil.copytree(self.work / "scenes", root)
        path = root / "annotations" / "instances_train2017.json"
        coco = json.loads(path.read_text())
        anns = [a for a in coco["annotations"] if isinstance(a.get("segmentation"), list)]
        picked = self.rng.sample(anns, min(len(anns), self.rng.randint(1, 6)))
        faults = Counter()
        for ann in picked:
            kind = self.rng.choice(["nan_polygon", "short_polygon", "huge_rle", "negative_box"])
            faults[kind] += 1
            if kind == "nan_polygon":
                ann["segmentation"][0][self.rng.randrange(len(ann["segmentation"][0]))] = float("nan")
            elif kind == "short_polygon":
                ann["segmentation"] = [ann["segmentation"][0][:4]]
            elif kind == "huge_rle":
                ann["segmentation"] = {"size": [40000, 40000], "counts": [0, 40000 * 40000]}
            else:
                ann["bbox"][2] = -abs(ann["bbox"][2]) - 1
        path.write_text(json.dumps(coco, allow_nan=True))
        metrics = run_prepare(DataConfig(workers=1), root, root.parent / "raw", progress=False)
        skipped = sum(metrics["annotations_skipped"].values())
        run_shard(ShardConfig(max_count=8, workers=1), root.parent / "raw", root.parent / "shards", progress=False)
        bad_ids = {a["id"] for a in picked}
        in_shards = _annotation_ids(root.parent / "shards") & bad_ids
        return {"damage": dict(faults), "annotations_skipped": skipped, "in_shards": len(in_shards),
                "recovered": skipped == len(picked) and not in_shards}

    def store_lock(self, n: int) -> dict:
        out = self.work / f"lock_{n}"
        out.mkdir()
        params = _params(out / "params.yaml", tracking=True)
        db = out / "mlflow.db"
        proc = subprocess.Popen(self._pretrain_cmd(out, params), cwd=self.work, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        hold = self.rng.uniform(5, 20)

        def lock() -> None:
            time.sleep(self.rng.uniform(0.2, 0.6) * self.pretrain_s)
            if not db.exists():
                return
            con = sqlite3.connect(db, timeout=60)
            con.execute("BEGIN EXCLUSIVE")
            time.sleep(hold)
            con.rollback()
            con.close()

        locker = threading.Thread(target=lock)
        locker.start()
        text, _ = proc.communicate(timeout=900)
        locker.join()
        ok = proc.returncode == 0 and (out / "metrics.json").is_file()
        logged = False
        if ok:
            import mlflow

            client = mlflow.MlflowClient(f"sqlite:///{db}")
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            logged = any(r.info.status == "FINISHED" and "final_loss" in r.data.metrics for r in runs)
        return {"locked_s": round(hold, 1), "exit": proc.returncode, "recovered": ok and logged,
                "mlflow_caught_up": logged}

    def round(self, n: int, kind: str) -> dict:
        t0 = time.perf_counter()
        try:
            res = getattr(self, kind)(n)
        except Exception as exc:  # a fault the campaign itself could not handle is a finding, not a crash
            res = {"recovered": False, "error": f"{type(exc).__name__}: {exc}"}
        res.update(kind=kind, round=n, seconds=round(time.perf_counter() - t0, 1))
        print(f"[chaos] round {n:2d} {kind:<18} {'recovered' if res['recovered'] else 'NOT RECOVERED'} "
              f"{json.dumps({k: v for k, v in res.items() if k not in ('kind', 'round', 'recovered')})}",
              flush=True)
        self.results.append(res)
        return res


def summarize(results: list[dict]) -> dict:
    by_kind = Counter(r["kind"] for r in results)
    ok = Counter(r["kind"] for r in results if r["recovered"])
    damage = [r for r in results if r["kind"] in ("shard_damage", "shard_swap") and "lost_real" in r]
    return {
        "faults_injected": len(results),
        "runs_recovered": sum(ok.values()),
        "by_kind": {k: f"{ok[k]}/{n}" for k, n in sorted(by_kind.items())},
        "samples_lost_real": sum(r["lost_real"] for r in damage),
        "samples_lost_counted": sum(r["lost_counted"] for r in damage),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {', '.join(KINDS)}")
    p.add_argument("--budget-s", type=float, default=1800, help="stop starting new rounds after this many seconds")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise SystemExit(f"chaos: unknown fault kind(s) {bad} (allowed: {', '.join(KINDS)})")
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chaos_") as tmp:
        camp = Campaign(Path(tmp), rng)
        try:
            camp.setup()
            print(f"[chaos] references ready in {time.perf_counter() - t0:.0f} s (a pretraining run: "
                  f"{camp.pretrain_s:.0f} s)", flush=True)
            for n in range(args.rounds):
                if time.perf_counter() - t0 > args.budget_s:
                    print(f"[chaos] budget of {args.budget_s:.0f} s spent after {n} rounds", flush=True)
                    break
                camp.round(n, rng.choice(kinds))
        finally:
            camp.close()  # stops the stack a tracking_server_kill round started
        summary = summarize(camp.results)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    print("\nchaos campaign")
    for k, v in summary.items():
        print(f"  {k:<22} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rounds": camp.results}, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
