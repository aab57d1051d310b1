"""Shard write and read throughput versus reading JPEG files one by one with PIL (prints figures, asserts nothing).

    .venv/bin/python benchmarks/shard_throughput.py [--case all|loader|many] [--images 2000] [--size 384]
                                                    [--workers N] [--batch 64] [--many-files 2000]

Case ``many`` (many small files, ``data.source: folder``): writes ``--many-files`` small images (64-160 px JPEGs, 2 %
PNGs, ~4 KB each) into a folder tree (50 folders x sub-folders), then times ``prepare`` and ``shard`` -- ours with 1
and N workers -- against a plain single-process loop doing the same work (walk, read, sha1, PIL decode check, write a
Parquet manifest; read each file, write tars with a JSON member). Images/s and MB/s for each. The default is 2000
files so it finishes in about a minute on a shared 2-core machine; ``--many-files 20000`` is the issue's size.

Case ``loader``:

1. Generates ``--images`` scene images of ``--size`` px with the scenes generator into a temp dir (COCO layout),
   runs ``prepare`` (decode check of every file) and ``shard`` with 1 and N writer processes: img/s, MB/s.
2. Reads + decodes every training image to a uint8 (3, H, W) RGB tensor, with 1 and N loader workers:
   - from the shards: ``components.data.loading.loader.make_loader(decode="rgb")`` (tar streams, torchvision/libjpeg-turbo)
   - from the folder: a ``torch.utils.data.Dataset`` that opens each file with ``PIL.Image.open(path).convert("RGB")``
     (ImageFolder-style, as the official SlotCon loader does), same batch size, same output tensors
   and prints img/s and the shards/folder ratio. Also the bytes-only read rate from shards (``decode="bytes"``: what
   a GPU-decode pipeline asks of the CPU workers).

Each timed pass follows an untimed warm-up pass, so both sides read from the page cache: the ratio is the per-file
overhead + decoder difference, not disk speed (on network/object storage the file-per-image side loses far more).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


class FolderDataset(torch.utils.data.Dataset):
    """One JPEG file per item, decoded by PIL: the ImageFolder way (official SlotCon ``ImageFolder`` + PIL loader)."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with open(self.paths[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _list_collate(batch):
    return batch


def time_folder(paths: list[str], workers: int, batch: int) -> float:
    def one_pass() -> int:
        dl = torch.utils.data.DataLoader(FolderDataset(paths), batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=_list_collate, generator=torch.Generator().manual_seed(0))
        return sum(len(b) for b in dl)

    one_pass()  # warm-up: page cache, worker start-up paths
    t = time.perf_counter()
    n = one_pass()
    return n / (time.perf_counter() - t)


def time_shards(urls: list[str], workers: int, batch: int, decode: str = "rgb") -> tuple[float, float]:
    from components.data.loading.loader import make_loader

    def one_pass() -> tuple[int, int]:
        loader = make_loader(urls, batch_size=batch, decode=decode, shuffle=True, num_workers=workers, seed=0)
        n = nbytes = 0
        for b in loader:
            n += len(b)
            if decode == "bytes":
                nbytes += sum(len(s["image"]) for s in b)
        return n, nbytes

    one_pass()
    t = time.perf_counter()
    n, nbytes = one_pass()
    dt = time.perf_counter() - t
    return n / dt, nbytes / 1e6 / dt


# --------------------------------------------------------------------------------------------------------------------
# many small files: ours vs a plain loop
# --------------------------------------------------------------------------------------------------------------------
def write_many_files(root: Path, n: int) -> tuple[int, int]:
    """``n`` small images in a tree: root/dir_NNN/sub_N/img_NNNNNN.jpg (2 % PNG). Returns (files, bytes)."""
    import io

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


def plain_prepare(root: Path, out: Path) -> tuple[int, int]:
    """The obvious single-process loop: walk, read, sha1, decode check, one Parquet manifest."""
    import hashlib
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rows, nbytes = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            data = (Path(dirpath) / name).read_bytes()
            nbytes += len(data)
            with Image.open(io.BytesIO(data)) as im:  # the same check as ours: full entropy decode, JPEG at 1/8 scale
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
                rows.append({"file": os.path.relpath(Path(dirpath) / name, root), "sha1": hashlib.sha1(data).hexdigest(),
                             "width": im.width, "height": im.height, "bytes": len(data)})
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "manifest.parquet")
    return len(rows), nbytes


def plain_shard(root: Path, manifest: Path, out: Path, per_shard: int) -> tuple[int, int]:
    """The obvious single-process shard writer: one tar after another, image bytes + a JSON member per sample."""
    import io
    import json
    import tarfile

    import pyarrow.parquet as pq

    rows = pq.read_table(manifest).to_pylist()
    out.mkdir(parents=True, exist_ok=True)
    nbytes = 0
    for s in range(0, len(rows), per_shard):
        with tarfile.open(out / f"shard-{s // per_shard:06d}.tar", "w") as tf:
            for i, r in enumerate(rows[s : s + per_shard]):
                data = (root / r["file"]).read_bytes()
                nbytes += len(data)
                for ext, payload in (("jpg", data), ("json", json.dumps(r).encode())):
                    ti = tarfile.TarInfo(f"{s + i:09d}.{ext}")
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
    return len(rows), nbytes


def many_files_case(work: Path, n: int, workers: int, per_shard: int) -> None:
    from components.config import DataConfig, ShardConfig
    from components.data.prepare.stage import run_prepare
    from components.data.shards.stage import run_shard

    t = time.perf_counter()
    files, nbytes = write_many_files(work / "tree", n)
    print(f"\nmany small files: {files} images ({nbytes / 1e6:.1f} MB, {nbytes / files / 1e3:.1f} KB avg) in a tree, "
          f"written in {time.perf_counter() - t:.1f} s")
    plain_prepare(work / "tree", work / "warm")  # warm-up: every file in the page cache for every contestant
    table = []
    t = time.perf_counter()
    k, b = plain_prepare(work / "tree", work / "plain_raw")
    dt = time.perf_counter() - t
    table.append(("prepare", "plain loop", k / dt, b / 1e6 / dt))
    for w in sorted({1, workers}):
        m = run_prepare(DataConfig(source="folder", root=str(work / "tree"), workers=w), "unused",
                        work / f"raw_w{w}", progress=False)
        table.append(("prepare", f"ours, {w} worker{'s' * (w > 1)}", m["images"] / m["seconds"],
                      m["bytes"] / 1e6 / m["seconds"]))
    t = time.perf_counter()
    k, b = plain_shard(work / "tree", work / "plain_raw" / "manifest.parquet", work / "plain_shards", per_shard)
    dt = time.perf_counter() - t
    table.append(("shard", "plain loop", k / dt, b / 1e6 / dt))
    for w in sorted({1, workers}):
        m = run_shard(ShardConfig(max_count=per_shard, max_bytes=10**9, workers=w, verify=False),
                      work / f"raw_w{w}", work / f"shards_w{w}", progress=False)
        table.append(("shard", f"ours, {w} worker{'s' * (w > 1)}", m["samples"] / m["seconds"],
                      nbytes / 1e6 / m["seconds"]))
    print(f"{'stage':>7} | {'who':>16} | {'img/s':>8} | {'MB/s':>6}   (whole stage, wall clock, image bytes; ours also "
          "checks formats/orientation, dedups, writes resumable parts)")
    for stage, who, ips, mbps in table:
        print(f"{stage:>7} | {who:>16} | {ips:>8.0f} | {mbps:>6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("all", "loader", "many"), default="all")
    ap.add_argument("--many-files", type=int, default=2000, help="images of the many-small-files case (20000 at full scale)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=384, help="square image side (COCO's are ~640x480)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="N (the other figure is 1)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--shard-count", type=int, default=250, help="samples per shard (>= N shards are needed)")
    ap.add_argument("--dir", default=None, help="work folder (default: a temp dir, removed at the end)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="shard_bench_") if args.dir is None else None
    work = Path(args.dir or tmp.name)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; {args.images} images of {args.size} px; "
          f"batch {args.batch}; work dir {work}")
    if args.case in ("all", "many"):
        many_files_case(work / "many", args.many_files, args.workers, args.shard_count)
    if args.case in ("all", "loader"):
        loader_case(args, work)
    if tmp is not None:
        tmp.cleanup()


def loader_case(args, work: Path) -> None:
    from components.config import DataConfig, ScenesConfig, ShardConfig
    from components.data.prepare.stage import run_prepare
    from components.data.scenes.stage import generate_scenes
    from components.data.shards.stage import run_shard, split_urls

    n_workers = sorted({1, args.workers})
    t = time.perf_counter()
    generate_scenes(ScenesConfig(num_train=args.images, num_val=8, image_size=args.size), work / "scenes")
    print(f"generate: {args.images + 8} images in {time.perf_counter() - t:.1f} s")
    pm = run_prepare(DataConfig(workers=args.workers), work / "scenes", work / "raw", progress=False)
    print(f"prepare ({args.workers} workers): {pm['img_per_s']:.0f} img/s (read + sha1 + decode check)")

    write = {}
    for w in n_workers:
        m = run_shard(ShardConfig(max_count=args.shard_count, max_bytes=10**9, workers=w, verify=False),
                      work / "raw", work / f"shards_w{w}", progress=False)
        write[w] = (m["img_per_s"], m["mb_per_s"])
    urls = split_urls(work / f"shards_w{n_workers[-1]}", "train2017")
    paths = sorted(str(p) for p in (work / "scenes" / "train2017").glob("*.jpg"))
    mb = sum(os.path.getsize(p) for p in paths) / 1e6
    print(f"train split: {len(paths)} JPEGs, {mb:.1f} MB ({mb / len(paths) * 1e3:.0f} KB avg) in {len(urls)} shards")

    rows = []
    for w in n_workers:
        folder = time_folder(paths, w, args.batch)
        shards, _ = time_shards(urls, w, args.batch, "rgb")
        raw_ips, raw_mbps = time_shards(urls, w, args.batch, "bytes")
        rows.append((w, write[w], folder, shards, raw_ips, raw_mbps))

    print()
    print(f"{'workers':>7} | {'shard write':>22} | {'folder+PIL decode':>17} | {'shards decode':>13} | {'ratio':>5} | "
          f"{'shards bytes only':>24}")
    for w, (wi, wm), folder, shards, raw_ips, raw_mbps in rows:
        print(f"{w:>7} | {wi:>8.0f} img/s {wm:>6.1f} MB/s | {folder:>11.0f} img/s | {shards:>7.0f} img/s | "
              f"{shards / folder:>5.2f} | {raw_ips:>9.0f} img/s {raw_mbps:>6.1f} MB/s")


if __name__ == "__main__":
    main()
