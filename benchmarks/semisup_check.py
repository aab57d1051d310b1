"""Science check of the semi-supervised segment methods: supervised vs ClassMix vs ReCo + ClassMix with few labels,
from SlotCon-pretrained and from random init, several seeds; prints a mean +- std table (mIoU on the val split).

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/semisup_check.py --work data/bench_semisup

The work folder holds the data (built on first use with the `slotcon` CLI from a params file derived from
params.yaml: the scenes at their most classes (12 things + 8 stuff; ``--things/--stuff``), shards, SlotCon
pretraining for ``--pretrain-epochs``, export) and ``results.json``, written after every run, so an interrupted
check resumes where it stopped. Every run uses the same split for a given seed (``split_seed = seed``) across methods
and inits. Semi-supervised runs are evaluated with their teacher (the protocol) and, for reference, their student.

Anchor (ReCo paper, Pascal VOC, 60 labels, DeepLabv3+ R101, 40k iterations): 36.1 -> 53.7 -> 57.1 mIoU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_data(work: Path, things: int, stuff: int, epochs: int) -> None:
    """scenes -> prepare -> shard -> pretrain -> export into ``work`` (skipped where the outputs exist)."""
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    params = work / "params.yaml"
    if not params.is_file():
        p = yaml.safe_load((ROOT / "params.yaml").read_text())
        p["tracking"]["enabled"] = False
        p["scenes"].update(num_thing_classes=things, num_stuff_classes=stuff)
        p["pretrain"]["epochs"] = epochs
        params.write_text(yaml.safe_dump(p, sort_keys=False))
    steps = [
        ("scenes", ["scenes", "--out", work / "scenes", "--metrics", work / "m_scenes.json"]),
        ("raw", ["prepare", "--scenes", work / "scenes", "--out", work / "raw", "--metrics", work / "m_prep.json"]),
        ("shards", ["shard", "--raw", work / "raw", "--out", work / "shards", "--metrics", work / "m_shard.json"]),
        ("pretrain/last.pt", ["pretrain", "--shards", work / "shards", "--out", work / "pretrain", "--checkpoints",
                              work / "ckpt_pretrain", "--metrics", work / "m_pretrain.json", "--plots",
                              work / "plots_pretrain"]),
        ("backbone.pt", ["export", "--checkpoint", work / "pretrain" / "last.pt", "--out", work / "backbone.pt"]),
    ]
    for out, cmd in steps:
        if (work / out).exists() and (out != "shards" or (work / out / "index.json").is_file()):
            continue
        print(f"semisup_check: building {work / out}", flush=True)
        subprocess.run([sys.executable, "-m", "components.cli", cmd[0], "--params", str(params),
                        *map(str, cmd[1:])], check=True, cwd=ROOT)


def make_cfg(method: str, seed: int, args):
    from components.config import SegmentConfig

    return SegmentConfig(
        method=method, labeled=args.labeled, split_seed=seed, seed=seed, head="deeplabv3plus", iters=args.iters,
        batch_size=args.batch, crop_size=args.crop, head_channels=args.width, lr=args.lr, compare_random=False,
        save_every=max(args.iters // 4, 1),
        semisup={"unlabeled_batch_size": args.batch},
        reco={"rep_dim": args.rep_dim, "num_queries": args.queries, "num_negatives": args.negatives})


def train(work: Path, method: str, init: str, seed: int, args):
    """``(model to evaluate, FitResult, split info)``; a finished run resumes from its last checkpoint (no step)."""
    from components.data.segmentation.sources import open_source
    from components.tracking import Tracker
    from components.transfer.export import load_backbone
    from components.transfer.segment.stage import split_train, train_one

    cfg = make_cfg(method, seed, args)
    src = open_source("", work / "shards", "auto", "train")
    labeled, unlabeled, split = split_train(cfg, src, None, Tracker())
    arch, sd = load_backbone(work / "backbone.pt")
    model, result = train_one(cfg, init=init, arch=arch, state_dict=None if init == "random" else sd,
                              where=str(work / "backbone.pt"), train_src=labeled,
                              checkpoints=work / "ckpt_check" / f"{method}_{init}_{seed}", tracker=None, prefix="",
                              method=method, unlabeled_src=unlabeled, device="cpu")
    return model, result, split


def run_one(work: Path, method: str, init: str, seed: int, args) -> dict:
    from components.data.segmentation.sources import open_source
    from components.transfer.segment.evaluation import evaluate

    val = open_source("", work / "shards", "auto", "val")
    val_samples = list(val.iterate())
    t0 = time.perf_counter()
    model, result, split = train(work, method, init, seed, args)
    out = {"method": method, "init": init, "seed": seed, "iters": args.iters, "train_s": time.perf_counter() - t0,
           "labeled_sha1": split.get("labeled_sha1"), "loss_last": result.curve[-1]["loss"] if result.curve else None}
    kw = dict(num_classes=val.num_classes, class_names=val.class_names, batch_size=8, device="cpu")
    m = evaluate(model, val_samples, **kw)
    out.update(mIoU=m["mIoU"], pixel_acc=m["pixel_acc"])
    if method != "supervised":
        s = evaluate(result.extra["model"], val_samples, **kw)
        out.update(student_mIoU=s["mIoU"], student_pixel_acc=s["pixel_acc"])
    return out


def picture(work: Path, seed: int, init: str, args, num: int = 4) -> Path:
    """image / ground truth / each method's prediction (teachers for the semi-supervised) on ``num`` val images, from
    the finished runs' last checkpoints -> ``<work>/predictions_<init>_seed<seed>.png``."""
    import itertools

    import matplotlib.pyplot as plt
    import torch

    from components.data.segmentation.sources import open_source
    from components.transfer.draw import draw_segmentation
    from components.transfer.segment.evaluation import normalize, predict

    val = open_source("", work / "shards", "auto", "val")
    samples = list(itertools.islice(val.iterate(), num))
    names = {"supervised": "supervised", "classmix": "ClassMix (teacher)", "reco": "ReCo+ClassMix (teacher)"}
    columns = []
    for method in args.methods:
        model = train(work, method, init, seed, args)[0].eval()
        with torch.no_grad():
            columns.append((names[method], [predict(model, normalize(s["image"][None])).argmax(1)[0] for s in samples]))
    path = work / f"predictions_{init}_seed{seed}.png"
    plt.close(draw_segmentation([s["image"] for s in samples], [s["label"] for s in samples], columns,
                                val.class_names, path))
    return path


def table(results: list[dict], methods, inits) -> str:
    def fmt(vals):
        if not vals:
            return "-"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{100 * statistics.mean(vals):5.1f} ± {100 * sd:4.1f} (n={len(vals)})"

    names = {"supervised": "supervised", "classmix": "ClassMix", "reco": "ReCo + ClassMix"}
    lines = [f"{'method':<18}" + "".join(f"{('mIoU, ' + i + ' init'):>28}" for i in inits)
             + "".join(f"{('student, ' + i):>26}" for i in inits)]
    for meth in methods:
        row = f"{names[meth]:<18}"
        for key in ("mIoU", "student_mIoU"):
            for i in inits:
                vals = [r[key] for r in results if r["method"] == meth and r["init"] == i and key in r]
                row += f"{fmt(vals):>28}" if key == "mIoU" else f"{fmt(vals):>26}"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "bench_semisup")
    ap.add_argument("--methods", nargs="+", default=["supervised", "classmix", "reco"])
    ap.add_argument("--inits", nargs="+", default=["pretrained", "random"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--labeled", type=int, default=8)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4, help="labelled (and unlabelled) images per step")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--width", type=int, default=64, help="ASPP/decoder width (paper: 256)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--rep-dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--negatives", type=int, default=128)
    ap.add_argument("--things", type=int, default=12)
    ap.add_argument("--stuff", type=int, default=8)
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import torch

    from components.io import write_json_atomic

    torch.set_num_threads(args.threads)
    res_path = args.work / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else []
    if not args.table_only:
        build_data(args.work, args.things, args.stuff, args.pretrain_epochs)
        done = {(r["method"], r["init"], r["seed"], r["iters"]) for r in results}
        for seed in args.seeds:
            for init in args.inits:
                for method in args.methods:
                    if (method, init, seed, args.iters) in done:
                        continue
                    r = run_one(args.work, method, init, seed, args)
                    results.append(r)
                    write_json_atomic(res_path, results)
                    print(f"semisup_check: {method:<10} {init:<10} seed {seed}: mIoU {100 * r['mIoU']:.1f}"
                          + (f" (student {100 * r['student_mIoU']:.1f})" if "student_mIoU" in r else "")
                          + f" in {r['train_s']:.0f} s", flush=True)
    if not args.table_only:
        print(f"semisup_check: picture {picture(args.work, args.seeds[0], args.inits[0], args)}", flush=True)
    results = [r for r in results if r["iters"] == args.iters]
    print(f"\nmIoU (%) on the scenes val split, {args.labeled} labelled images, {args.iters} iterations, "
          f"seeds {args.seeds}; mean ± std over seeds")
    print(table(results, args.methods, args.inits))
    print("anchor (ReCo paper, VOC, 60 labels): supervised 36.1 -> ClassMix 53.7 -> ReCo + ClassMix 57.1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
