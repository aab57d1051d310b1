"""Shard stage throughput against a plain tar writer, its cost per image as the dataset grows, and the memory of
planning an ImageNet-size split (prints figures and ratios, asserts nothing).

    .venv/bin/python benchmarks/shard_throughput.py [--quick] [--case all|ratio|scaling|plan] [--workers 2]
                                                    [--files 20000] [--coco 1500] [--scaling 2000,20000,200000]
                                                    [--plan-rows 1280000]

``ratio``: two inputs, each prepared once with ``slotcon prepare`` (which also puts every file in the page cache):
a tree of ``--files`` small images (64-160 px JPEGs, 2 % PNGs, ~2.4 KB) and ``--coco`` COCO-size JPEGs (640x480
noise + rectangles, ~135 KB). On each, with 1 and N processes: ``run_shard`` (whole stage: plan, write with source
sha1 check, fsync, done-records, manifest, index; no ``--verify``) against a plain writer (the same files in the same
shard sizes, ``tarfile`` with a ``.jpg`` and a ``.json`` member per sample, the shards split over the same number of
processes, nothing checked, hashed or synced). Wall clock; img/s, MB/s of image bytes, ratio ours/plain.

``scaling``: the cost per image of ``run_shard`` (2 workers) on trees of 2k, 20k and 200k tiny JPEGs (~300 B, so 200k
fit in a few minutes and ~1 GB of disk); the raw manifest is written directly (prepare is not what is measured),
each tree and its shards deleted before the next. Linear growth = a flat us/img column.

``plan``: peak RSS of planning a 1.28 M-entry split (ImageNet's train size; manifest rows only, no files), in a fresh
process: reading the manifest, ordering, cutting it into shards.

``--quick``: small sizes of everything (a smoke test in well under a minute).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from components.config import DataConfig, ShardConfig  # noqa: E402
from components.data.prepare.stage import run_prepare  # noqa: E402
from components.data.prepare.tree import manifest_schema  # noqa: E402
from components.data.shards.stage import plan_split, run_shard  # noqa: E402

PER_SHARD = 1000  # samples per shard for every contestant (COCO's setting)


# --------------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------------
def write_many_files(root: Path, n: int) -> tuple[int, int]:
    """``n`` small images in a tree: root/dir_NNN/sub_N/img_NNNNNN.jpg (2 % PNG). Returns (files, bytes)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        w, h = (int(v) for v in rng.integers(64, 161, 2))
        y, x = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 256, 3)
        img = ((base[None, None] + x[..., None] * rng.uniform(0.2, 1.5, 3) + y[..., None] * rng.uniform(0.2, 1.5, 3))
               % 256).astype(np.uint8)
        png = i % 50 == 49
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG" if png else "JPEG", **({} if png else {"quality": 85}))
        d = root / f"dir_{i % 50:03d}" / f"sub_{(i // 50) % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:06d}.{'png' if png else 'jpg'}").write_bytes(buf.getvalue())
        total += buf.tell()
    return n, total


def write_coco_size(root: Path, n: int, seed: int = 1) -> tuple[int, int]:
    """``n`` 640x480 JPEGs (noise + filled rectangles, quality 62-71: ~135 KB, COCO's typical size) in 10 folders."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        im = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(8):
            x, y = (int(v) for v in rng.integers(0, 600, 2))
            draw.rectangle([x, y, x + int(rng.integers(20, 200)), y + int(rng.integers(20, 200))],
                           fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(62, 72)))
        d = root / f"sub_{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        total += buf.tell()
    return n, total


def tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 200)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def write_raw_index(raw: Path, root: Path, rows: int, split: str = "train") -> None:
    """The ``index.json`` ``prepare`` writes for a folder source with one split."""
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "index.json").write_text(json.dumps({
        "source": "folder", "root": str(root), "pretrain": [split], "train": split, "val": None, "categories": [],
        "semantic_classes": None, "classes": None, "notes": {},
        "image_policy": {"duplicates": "skip", "non_jpeg": "transcode", "transcode_quality": 95},
        "splits": {split: {"manifest": f"folder/{split}/manifest.parquet", "image_dir": "", "labeled": False,
                           "annotations": None, "annotations_sha1": None, "num_images": rows, "num_skipped": 0}},
    }))


def write_manifest(raw: Path, columns: dict[str, list], split: str = "train") -> None:
    """A folder source's manifest (prepare's schema) from columns ``key``, ``file_name``, ``bytes``, ``sha1``."""
    n = len(columns["key"])
    full = {"id": list(range(n)), "width": [8] * n, "height": [8] * n, "mode": ["RGB"] * n,
            "num_annotations": [0] * n, "seg_file": [None] * n, "label": [None] * n, "label_name": [None] * n,
            "format": ["JPEG"] * n, "orientation": [1] * n, "transcode": [False] * n, **columns}
    schema = manifest_schema({"split": split})
    path = raw / "folder" / split / "manifest.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({f.name: full[f.name] for f in schema}, schema=schema), path)


# --------------------------------------------------------------------------------------------------------------------
# the plain writer: tarfile, one .jpg + one .json member per sample, shards split over the processes
# --------------------------------------------------------------------------------------------------------------------
def _plain_one(job: tuple[str, list[dict]]) -> tuple[int, int]:
    path, rows = job
    nbytes = 0
    with tarfile.open(path, "w") as tf:
        for r in rows:
            with open(r["path"], "rb") as f:
                data = f.read()
            nbytes += len(data)
            meta = json.dumps({"file_name": r["file_name"], "width": r["width"], "height": r["height"]}).encode()
            for ext, payload in (("jpg", data), ("json", meta)):
                ti = tarfile.TarInfo(f"{r['key']}.{ext}")
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    return len(rows), nbytes


def plain_shard(manifest: Path, root: Path, out: Path, workers: int, per_shard: int = PER_SHARD) -> tuple[int, int]:
    """The obvious writer: the manifest's files, ``per_shard`` to a tar, the tars spread over ``workers`` processes."""
    rows = pq.read_table(manifest, columns=["key", "file_name", "width", "height"]).to_pylist()
    for r in rows:
        r["path"] = str(root / r["file_name"])
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out / f"shard-{s // per_shard:06d}.tar"), rows[s:s + per_shard]) for s in range(0, len(rows), per_shard)]
    if workers <= 1:
        done = [_plain_one(j) for j in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            done = pool.map(_plain_one, jobs, chunksize=1)
    return sum(d[0] for d in done), sum(d[1] for d in done)


# --------------------------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------------------------
def _ours(raw: Path, out: Path, workers: int, per_shard: int = PER_SHARD) -> tuple[int, float]:
    t = time.perf_counter()
    m = run_shard(ShardConfig(max_count=per_shard, max_bytes=10**10, workers=workers, verify=False), raw, out,
                  progress=False)
    return m["samples"], time.perf_counter() - t


def _plain(raw: Path, root: Path, out: Path, workers: int, per_shard: int = PER_SHARD) -> tuple[int, float]:
    t = time.perf_counter()
    n, _ = plain_shard(raw / "folder" / "train" / "manifest.parquet", root, out, workers, per_shard)
    return n, time.perf_counter() - t


def ratio_case(work: Path, name: str, write, n: int, workers: list[int], per_shard: int, repeat: int) -> list[tuple]:
    """Plain and ours in turn, ``repeat`` pairs for each process count, on one input (prepared once; ``per_shard``
    samples per shard): median img/s of each and the median of the pairs' ratios (a pair ran under the same load)."""
    root, raw = work / f"{name}_tree", work / f"{name}_raw"
    files, nbytes = write(root, n)
    run_prepare(DataConfig(source="folder", root=str(root), workers=max(workers)), "unused", raw, progress=False)
    rows = []
    for w in workers:
        _plain(raw, root, work / "warm", w, per_shard)  # warm-ups: page cache, imports, the pools' first start
        _ours(raw, work / "warm_ours", w, per_shard)
        for d in ("warm", "warm_ours"):
            shutil.rmtree(work / d)
        plain_s, ours_s = [], []
        for _ in range(repeat):
            k1, dt = _plain(raw, root, work / "plain", w, per_shard)
            plain_s.append(dt)
            k2, dt = _ours(raw, work / "ours", w, per_shard)
            ours_s.append(dt)
            assert k1 == k2 == files, (k1, k2, files)
            for d in ("plain", "ours"):
                shutil.rmtree(work / d)
        ratios = [p / o for p, o in zip(plain_s, ours_s)]
        p, o = float(np.median(plain_s)), float(np.median(ours_s))
        rows.append((name, nbytes / files / 1e3, w, files / p, nbytes / 1e6 / p, files / o, nbytes / 1e6 / o,
                     float(np.median(ratios)), min(ratios), max(ratios)))
    shutil.rmtree(root)
    shutil.rmtree(raw)
    return rows


def print_ratios(rows: list[tuple]) -> None:
    print(f"\n{'input':>10} | {'KB/img':>6} | {'procs':>5} | {'plain tar img/s':>15} | {'MB/s':>6} | "
          f"{'ours img/s':>10} | {'MB/s':>6} | ratio ours/plain, median (range) of the pairs")
    for name, kb, w, pi, pm, oi, om, r, lo, hi in rows:
        print(f"{name:>10} | {kb:>6.1f} | {w:>5} | {pi:>15.0f} | {pm:>6.1f} | {oi:>10.0f} | {om:>6.1f} | "
              f"ratio {r:.2f} ({lo:.2f}-{hi:.2f})")


def scaling_case(work: Path, sizes: list[int], workers: int) -> None:
    print(f"\ncost per image of run_shard ({workers} workers, tiny ~300 B JPEGs; tree written and deleted per size)")
    print(f"{'images':>8} | {'seconds':>8} | {'us/img':>7} | {'img/s':>7}")
    base = tiny_jpeg()
    for n in sizes:
        root, raw = work / f"tiny_{n}", work / f"tiny_{n}_raw"
        keys, names, sizes_, shas = [], [], [], []
        for i in range(n):
            data = base[:-2] + b"\xff\xfe\x00\x06" + i.to_bytes(4, "little") + base[-2:]  # a COM segment: unique bytes
            rel = f"d{i % 100:02d}/{i:07d}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            keys.append(f"img{i:07d}")
            names.append(rel)
            sizes_.append(len(data))
            shas.append(hashlib.sha1(data).hexdigest())
        write_raw_index(raw, root, n)
        write_manifest(raw, {"key": keys, "file_name": names, "bytes": sizes_, "sha1": shas})
        k, dt = _ours(raw, work / "tiny_out", workers)
        assert k == n
        print(f"{n:>8} | {dt:>8.2f} | {dt / n * 1e6:>7.1f} | {n / dt:>7.0f}")
        for d in (root, raw, work / "tiny_out"):
            shutil.rmtree(d)


def write_plan_input(work: Path, rows: int) -> None:
    """A ``rows``-entry ImageNet-like raw manifest (no image files)."""
    write_raw_index(work, work, rows)
    keys = [f"n{i % 1000:08d}_{i:08d}" for i in range(rows)]
    write_manifest(work, {"key": keys, "file_name": [f"{k[:9]}/{k}.JPEG" for k in keys],
                          "bytes": [110_000] * rows, "sha1": [hashlib.sha1(k.encode()).hexdigest() for k in keys]})


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not carried over from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan_rss(work: str) -> None:
    """Run in a fresh process: peak RSS after the imports, then after planning the split in ``work``."""
    before = _peak_rss_mb()
    t = time.perf_counter()
    index = json.loads((Path(work) / "index.json").read_text())
    plan = plan_split(ShardConfig(max_count=PER_SHARD, max_bytes=10**10), Path(work), index, Path(work), "train")
    dt = time.perf_counter() - t
    peak = _peak_rss_mb()
    print(f"\nplan of {plan.table.num_rows} entries: {len(plan.cuts)} shards in {dt:.1f} s; peak RSS {peak:.0f} MB "
          f"(imports alone: {before:.0f} MB; planning added {peak - before:.0f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("all", "ratio", "scaling", "plan"), default="all")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--workers", type=int, default=2, help="N (the other figure is 1)")
    ap.add_argument("--files", type=int, default=20000, help="small files of the tree input")
    ap.add_argument("--coco", type=int, default=1500, help="COCO-size JPEGs")
    ap.add_argument("--scaling", default="2000,20000,200000", help="tree sizes of the cost-per-image curve")
    ap.add_argument("--plan-rows", type=int, default=1_280_000)
    ap.add_argument("--repeat", type=int, default=3, help="plain/ours pairs per figure (medians)")
    ap.add_argument("--dir", default=None, help="work folder (default: a temp dir, removed at the end)")
    ap.add_argument("--plan-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plan_child:
        plan_rss(args.plan_child)
        return
    if args.quick:
        args.files, args.coco, args.scaling, args.plan_rows, args.repeat = 400, 40, "200,800", 5000, 1
    tmp = tempfile.TemporaryDirectory(prefix="shard_bench_") if args.dir is None else None
    work = Path(args.dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}; work dir {work}")
    workers = sorted({1, args.workers})
    if args.case in ("all", "ratio"):
        # shard sizes that give every process the same work: 20 shards of each input (COCO itself has 118, so the
        # last shard's fsync, which nothing overlaps, is a small part of the whole there too)
        rows = []
        if args.files:  # 0 leaves an input out
            rows += ratio_case(work, "tree", write_many_files, args.files, workers, max(1, args.files // 20),
                               args.repeat)
        if args.coco:
            rows += ratio_case(work, "coco-size", write_coco_size, args.coco, workers, max(1, args.coco // 20),
                               args.repeat)
        print_ratios(rows)
    if args.case in ("all", "scaling"):
        scaling_case(work, [int(s) for s in args.scaling.split(",")], args.workers)
    if args.case in ("all", "plan"):
        write_plan_input(work / "plan", args.plan_rows)
        subprocess.run([sys.executable, __file__, "--plan-child", str(work / "plan")], check=True)
        shutil.rmtree(work / "plan")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
