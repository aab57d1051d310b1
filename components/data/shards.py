"""Stage ``shard``: WebDataset tar shards with the original JPEG bytes, a Parquet manifest, and ``--verify``.

Input: what ``prepare`` wrote under ``--raw`` (``index.json`` + ``<source>/<split>/manifest.parquet``); the images and
annotation files are read from the source root it recorded. Output under ``--out`` (``data/shards``)::

    <split>/<split>-000000.tar ...   samples: <key>.jpg (original bytes), <key>.json, <key>.seg.png (if a map exists)
    <split>/manifest.parquet         key -> shard, index in shard, byte offset, sizes and sha1 of every member
    index.json                       written last: its presence marks a complete run (see read_index / split_urls)

Determinism (DVC hashes must not change on a re-run): samples are shuffled once by ``shard.seed`` (so a shard
holds a random mix and the loader's small shuffle buffer suffices), shards are cut at ``max_count`` samples or
``max_bytes`` bytes, members are written in sorted order with a fixed mtime, owner and mode, and JSON is dumped with
sorted keys. Each shard is written to ``.<name>.tmp`` and renamed when complete, so an interrupted run never leaves a
file that looks like a finished shard, and ``index.json`` is only written once every shard and manifest exists.
Shards are written in parallel (``shard.workers`` processes, one whole shard per task).
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterable

from components.errors import UserError
from components.stage import Arg, Stage

FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: any constant works; the current time would change every shard's bytes
TAR_USER = "slotcon"
TAR_MODE = 0o444
BLOCK = 512  # tar block size: every member is a 512-byte header plus its data padded to 512
INDEX_NAME = "index.json"


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def tmp_name(name: str) -> str:
    return f".{name}.tmp"


def _member_span(size: int) -> int:
    """Bytes a member occupies in a USTAR archive: header + data rounded up to the block size."""
    return BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK


def dump_meta(obj: Any) -> bytes:
    """Canonical JSON for the ``json`` member: sorted keys, no whitespace -> the same bytes on every run."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class _HashingFile:
    """Write-through file wrapper that hashes and counts what the tar writer emits (no second read of the shard)."""

    def __init__(self, f):
        self.f, self.sha1, self.size = f, hashlib.sha1(), 0

    def write(self, b) -> int:
        self.sha1.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


# --------------------------------------------------------------------------------------------------------------------
# writing one shard (runs in a worker process)
# --------------------------------------------------------------------------------------------------------------------
def write_shard(task: dict[str, Any], on_sample: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write one shard: ``task = {"path", "samples": [{"key", "image", "sha1", "meta", "seg"}]}``.

    Members are ``<key>.jpg`` (the file's bytes, checked against the sha1 ``prepare`` recorded), ``<key>.json``
    (``meta`` bytes) and ``<key>.seg.png``. Written to ``.<name>.tmp``, fsynced, then renamed. Returns the shard's
    size, sha1 and one manifest record per sample. ``on_sample(i)`` is a test hook called before sample ``i``.
    """
    path = Path(task["path"])
    tmp = path.parent / tmp_name(path.name)
    try:
        hf, records = _write_tar(tmp, task["samples"], path.name, on_sample)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a Python-level failure cleans up; a SIGKILL leaves a .tmp that --verify rejects
        raise
    os.replace(tmp, path)
    return {"name": path.name, "num_samples": len(records), "bytes": hf.size, "sha1": hf.sha1.hexdigest(),
            "records": records}


def _write_tar(tmp: Path, samples: list[dict[str, Any]], name: str, on_sample) -> tuple[_HashingFile, list[dict]]:
    import webdataset as wds

    records: list[dict[str, Any]] = []
    offset = 0
    with open(tmp, "wb") as raw:
        hf = _HashingFile(raw)
        # TarWriter writes a sample's members in sorted key order (jpg < json < seg.png); fixed mtime/owner/mode
        with wds.TarWriter(hf, user=TAR_USER, group=TAR_USER, mode=TAR_MODE, encoder=False, mtime=FIXED_MTIME) as tw:
            for i, s in enumerate(samples):
                if on_sample is not None:
                    on_sample(i)
                jpg = Path(s["image"]).read_bytes()
                if hashlib.sha1(jpg).hexdigest() != s["sha1"]:
                    raise UserError(f"{s['image']}: content changed since `slotcon prepare` (sha1 differs); re-run prepare")
                sample = {"__key__": s["key"], "jpg": jpg, "json": s["meta"]}
                seg = Path(s["seg"]).read_bytes() if s.get("seg") else None
                if seg is not None:
                    sample["seg.png"] = seg
                tw.write(sample)
                rec = {
                    "key": s["key"], "id": s["id"], "shard": name, "index": i, "offset": offset,
                    "bytes": len(jpg), "sha1": s["sha1"], "json_bytes": len(s["meta"]),
                    "json_sha1": hashlib.sha1(s["meta"]).hexdigest(),
                    "seg_bytes": len(seg) if seg is not None else None,
                    "seg_sha1": hashlib.sha1(seg).hexdigest() if seg is not None else None,
                    "num_annotations": s["num_annotations"], "width": s["width"], "height": s["height"],
                }
                offset += sum(_member_span(len(v)) for k, v in sample.items() if k != "__key__")
                records.append(rec)
        raw.flush()
        os.fsync(raw.fileno())
    return hf, records


# --------------------------------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------------------------------
def _split_seed(seed: int, split: str) -> list[int]:
    return [seed, zlib.crc32(split.encode())]


def plan_shards(items: list[dict[str, Any]], max_count: int, max_bytes: int) -> list[list[dict[str, Any]]]:
    """Cut an ordered list of samples into shards of at most ``max_count`` samples and ``max_bytes`` bytes (a shard
    holds at least one sample even if that one is larger). Sizes are known up front, so every shard can be written by
    an independent process and the cut never depends on the number of workers."""
    shards: list[list[dict[str, Any]]] = []
    cur: list[dict[str, Any]] = []
    cur_bytes = 2 * 10240  # end-of-archive blocks + record padding
    for it in items:
        size = it["size"]
        if cur and (len(cur) >= max_count or cur_bytes + size > max_bytes):
            shards.append(cur)
            cur, cur_bytes = [], 2 * 10240
        cur.append(it)
        cur_bytes += size
    if cur:
        shards.append(cur)
    return shards


def _group_annotations(path: Path) -> tuple[dict[int, dict], dict[int, list[dict]]]:
    from components.data.coco import load_instances

    data = load_instances(path, "coco")
    images = {r["id"]: r for r in data["images"] if isinstance(r, dict) and "id" in r}
    anns: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        anns.setdefault(a.get("image_id"), []).append(a)
    for lst in anns.values():
        lst.sort(key=lambda a: (a.get("id", 0)))
    return images, anns


def _clean_out(out_dir: Path, splits: Iterable[str]) -> None:
    """Remove what a previous (possibly interrupted) run left: index.json first, so nothing looks complete."""
    (out_dir / INDEX_NAME).unlink(missing_ok=True)
    for split in splits:
        d = out_dir / split
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name == "manifest.parquet" or (p.name.startswith(f"{split}-") and p.name.endswith(".tar")) or (
                p.name.startswith(f".{split}-") and p.name.endswith(".tmp")
            ):
                p.unlink()


# --------------------------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------------------------
def run_shard(
    cfg,
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tracker=None,
    progress: bool = True,
    on_sample: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write the shards of every split ``prepare`` found; returns metrics (samples, shards, bytes, img/s, MB/s).

    ``cfg`` is a :class:`components.config.ShardConfig`. ``on_sample`` is a test hook (interruption tests) passed
    to :func:`write_shard`; with it set, shards are written in this process.
    """
    import numpy as np
    from tqdm import tqdm

    from components.data.coco import read_manifest, resolve_root
    from components.io import write_json_atomic

    t0 = time.perf_counter()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    raw_index_path = raw_dir / INDEX_NAME
    if not raw_index_path.is_file():
        raise UserError(f"{raw_index_path}: not found; run `slotcon prepare` (or `dvc repro prepare`) first")
    raw_index = json.loads(raw_index_path.read_text())
    root = resolve_root(raw_dir, raw_index)
    splits = list(raw_index["splits"])
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_out(out_dir, splits)

    # ---- plan every split (cheap: manifests, annotation JSON, file sizes) ----
    tasks: list[dict[str, Any]] = []
    split_tasks: dict[str, list[int]] = {}
    for split in splits:
        info = raw_index["splits"][split]
        mpath = raw_dir / info["manifest"]
        if not mpath.is_file():
            raise UserError(f"{mpath}: not found; re-run `slotcon prepare`")
        rows, _ = read_manifest(mpath)
        images: dict[int, dict] = {}
        anns: dict[int, list[dict]] = {}
        if info.get("annotations"):
            ann_path = root / info["annotations"]
            if not ann_path.is_file():
                raise UserError(f"{ann_path}: not found (prepare saw it); re-run `slotcon prepare`")
            from components.data.coco import _sha1_file

            if info.get("annotations_sha1") and _sha1_file(ann_path) != info["annotations_sha1"]:
                raise UserError(f"{ann_path}: changed since `slotcon prepare` (sha1 differs); re-run prepare")
            images, anns = _group_annotations(ann_path)
        image_dir = root / info["image_dir"]
        items = []
        for r in sorted(rows, key=lambda r: r["key"]):
            record = images.get(r["id"]) or {
                "id": r["id"], "file_name": r["file_name"], "width": r["width"], "height": r["height"],
            }
            meta = dump_meta({"image": record, "annotations": anns.get(r["id"], [])})
            seg = str(root / r["seg_file"]) if r["seg_file"] else None
            seg_size = os.path.getsize(seg) if seg else 0
            items.append({
                "key": r["key"], "id": r["id"], "image": str(image_dir / r["file_name"]), "sha1": r["sha1"],
                "meta": meta, "seg": seg, "num_annotations": r["num_annotations"], "width": r["width"],
                "height": r["height"],
                "size": _member_span(r["bytes"]) + _member_span(len(meta)) + (_member_span(seg_size) if seg else 0),
            })
        # shuffled once at write time, seeded per split: shards are random mixes and the order is reproducible
        perm = np.random.default_rng(_split_seed(cfg.seed, split)).permutation(len(items))
        items = [items[i] for i in perm]
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        split_tasks[split] = []
        for i, shard in enumerate(plan_shards(items, cfg.max_count, cfg.max_bytes)):
            split_tasks[split].append(len(tasks))
            tasks.append({"path": str(out_dir / split / shard_name(split, i)), "samples": shard})

    # ---- write (parallel across shards) ----
    total = sum(len(t["samples"]) for t in tasks)
    results: dict[int, dict[str, Any]] = {}
    bar = tqdm(total=total, desc="shard", unit="img", disable=not progress, dynamic_ncols=True, leave=False)
    t_write = time.perf_counter()
    try:
        if cfg.workers <= 1 or len(tasks) == 1 or on_sample is not None:
            for i, t in enumerate(tasks):
                results[i] = write_shard(t, on_sample)
                bar.update(results[i]["num_samples"])
        else:
            with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
                futs = {pool.submit(write_shard, t): i for i, t in enumerate(tasks)}
                pending = set(futs)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        results[futs[f]] = f.result()  # re-raises a worker's error (e.g. a changed image)
                        bar.update(results[futs[f]]["num_samples"])
    finally:
        bar.close()
    write_s = time.perf_counter() - t_write

    # ---- manifests, then index.json (last: it marks the run complete) ----
    index_splits: dict[str, Any] = {}
    metrics: dict[str, Any] = {"source": raw_index["source"], "splits": {}}
    total_bytes = 0
    for split in splits:
        shard_results = [results[i] for i in split_tasks[split]]
        records = [rec for r in shard_results for rec in r["records"]]
        shards_meta = [{k: r[k] for k in ("name", "num_samples", "bytes", "sha1")} for r in shard_results]
        _write_shard_manifest(out_dir / split / "manifest.parquet", records, {
            "split": split, "source": raw_index["source"], "labeled": raw_index["splits"][split]["labeled"],
            "num_samples": len(records), "shards": shards_meta,
        })
        nbytes = sum(s["bytes"] for s in shards_meta)
        total_bytes += nbytes
        index_splits[split] = {
            "num_samples": len(records),
            "shards": [f"{split}/{s['name']}" for s in shards_meta],
            "shard_samples": [s["num_samples"] for s in shards_meta],  # what a reader must find in each shard
            "labeled": raw_index["splits"][split]["labeled"],
            "with_seg": sum(r["seg_sha1"] is not None for r in records),
            "bytes": nbytes,
        }
        metrics["splits"][split] = {"samples": len(records), "shards": len(shards_meta), "bytes": nbytes}
    index = {
        "source": raw_index["source"], "splits": index_splits, "pretrain": raw_index["pretrain"],
        "train": raw_index["train"], "val": raw_index["val"], "categories": raw_index["categories"],
        "semantic_classes": raw_index["semantic_classes"],
    }
    write_json_atomic(out_dir / INDEX_NAME, index)

    seconds = time.perf_counter() - t0
    metrics.update(
        samples=total, shards=len(tasks), bytes=total_bytes, seconds=round(seconds, 3),
        img_per_s=round(total / max(write_s, 1e-9), 1), mb_per_s=round(total_bytes / 1e6 / max(write_s, 1e-9), 2),
    )
    print(f"shard: {total} samples -> {len(tasks)} shards ({total_bytes / 1e6:.1f} MB) in {write_s:.2f} s: "
          f"{metrics['img_per_s']:.0f} img/s, {metrics['mb_per_s']:.1f} MB/s ({cfg.workers} workers)")
    if cfg.verify:
        v = verify_shards(out_dir, workers=cfg.workers, progress=progress)
        metrics["verified_samples"] = v["samples"]
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "source"})
        tracker.log_dict(index, "shards_index.json")
    return metrics


SHARD_MANIFEST_COLUMNS = (
    "key", "id", "shard", "index", "offset", "bytes", "sha1", "json_bytes", "json_sha1", "seg_bytes", "seg_sha1",
    "num_annotations", "width", "height",
)


def _write_shard_manifest(path: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.io import atomic_open

    schema = pa.schema(
        [("key", pa.string()), ("id", pa.int64()), ("shard", pa.string()), ("index", pa.int32()),
         ("offset", pa.int64()), ("bytes", pa.int64()), ("sha1", pa.string()), ("json_bytes", pa.int64()),
         ("json_sha1", pa.string()), ("seg_bytes", pa.int64()), ("seg_sha1", pa.string()),
         ("num_annotations", pa.int32()), ("width", pa.int32()), ("height", pa.int32())],
        metadata={"slotcon": json.dumps(meta, sort_keys=True)},
    )
    with atomic_open(path, "wb") as f:
        pq.write_table(pa.Table.from_pylist(records, schema=schema), f, compression="zstd")


# --------------------------------------------------------------------------------------------------------------------
# reading the index, verifying
# --------------------------------------------------------------------------------------------------------------------
def read_index(shards_root: str | os.PathLike) -> dict[str, Any]:
    """``<shards_root>/index.json`` (see the module docstring); a missing one is a one-line UserError."""
    path = Path(shards_root) / INDEX_NAME
    if not path.is_file():
        raise UserError(f"{path}: not found: the shard stage has not completed; run `slotcon shard` (or `dvc repro shard`)")
    return json.loads(path.read_text())


def split_urls(shards_root: str | os.PathLike, split: str) -> list[str]:
    """Paths of ``split``'s shards (local paths: the loader also takes brace patterns, ``pipe:`` and fsspec URLs)."""
    index = read_index(shards_root)
    if split not in index["splits"]:
        raise UserError(f"{Path(shards_root) / INDEX_NAME}: no split {split!r} (have: {', '.join(index['splits'])})")
    return [str(Path(shards_root) / s) for s in index["splits"][split]["shards"]]


def expected_counts(shards_root: str | os.PathLike, split: str) -> dict[str, int]:
    """``{shard path: number of samples written}`` of ``split`` (from index.json): a reader that finds fewer in a shard
    lost the rest (Python's tarfile ends silently at a damaged header), so the loader counts the difference."""
    index = read_index(shards_root)
    info = index["splits"].get(split)
    if info is None:
        raise UserError(f"{Path(shards_root) / INDEX_NAME}: no split {split!r} (have: {', '.join(index['splits'])})")
    counts = info.get("shard_samples")
    if counts is None or len(counts) != len(info["shards"]):
        raise UserError(f"{Path(shards_root) / INDEX_NAME}: no per-shard sample counts (written by an older "
                        "`slotcon shard`); re-run `slotcon shard`")
    return {str(Path(shards_root) / s): int(n) for s, n in zip(info["shards"], counts)}


def _verify_one(args: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> str | None:
    """Re-read one shard and compare it with its manifest rows; returns a one-line problem or None."""
    path, smeta, rows = args
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        return f"{p}: cannot read ({exc})"
    if len(data) != smeta["bytes"] or hashlib.sha1(data).hexdigest() != smeta["sha1"]:
        return f"{p}: size/sha1 differ from manifest.parquet (shard damaged or rewritten); re-run `slotcon shard`"
    import io

    members: list[tuple[str, int, bytes]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for ti in tf:
                members.append((ti.name, ti.offset, tf.extractfile(ti).read()))
    except (tarfile.TarError, OSError) as exc:
        return f"{p}: not a readable tar ({exc}); re-run `slotcon shard`"
    by_key: dict[str, dict[str, tuple[int, bytes]]] = {}
    order: list[str] = []
    for name, off, payload in members:
        key, _, ext = name.partition(".")
        if key not in by_key:
            by_key[key] = {}
            order.append(key)
        by_key[key][ext] = (off, payload)
    rows = sorted(rows, key=lambda r: r["index"])
    if order != [r["key"] for r in rows]:
        return f"{p}: keys/order differ from manifest.parquet ({len(order)} in tar, {len(rows)} in manifest)"
    for r in rows:
        m = by_key[r["key"]]
        checks = [("jpg", r["bytes"], r["sha1"]), ("json", r["json_bytes"], r["json_sha1"])]
        if r["seg_sha1"] is not None:
            checks.append(("seg.png", r["seg_bytes"], r["seg_sha1"]))
        if set(m) != {c[0] for c in checks}:
            return f"{p}: sample {r['key']!r} has members {sorted(m)}, manifest expects {sorted(c[0] for c in checks)}"
        for ext, nbytes, sha in checks:
            payload = m[ext][1]
            if len(payload) != nbytes or hashlib.sha1(payload).hexdigest() != sha:
                return f"{p}: sample {r['key']!r} member {ext} differs from manifest.parquet; re-run `slotcon shard`"
        if m["jpg"][0] != r["offset"]:
            return f"{p}: sample {r['key']!r} at byte {m['jpg'][0]}, manifest says {r['offset']}"
    return None


def verify_shards(shards_root: str | os.PathLike, *, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Re-read every shard and check it against ``index.json`` and the split manifests.

    Checks: index present (the run completed), no leftover temporary files, exactly the listed shard files, each
    shard's size and sha1, member keys, order, offsets, sizes and sha1s. Raises a one-line UserError on the first
    mismatch; returns counts when everything agrees.
    """
    from tqdm import tqdm

    from components.data.coco import read_manifest

    root = Path(shards_root)
    index = read_index(root)
    jobs: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = []
    for split, info in index["splits"].items():
        d = root / split
        mpath = d / "manifest.parquet"
        if not mpath.is_file():
            raise UserError(f"{mpath}: not found; the shard stage did not complete; re-run `slotcon shard`")
        rows, meta = read_manifest(mpath)
        leftovers = sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))
        if leftovers:
            raise UserError(f"{d / leftovers[0]}: leftover temporary file of an interrupted write; re-run `slotcon shard`")
        listed = [Path(s).name for s in info["shards"]]
        present = sorted(p.name for p in d.glob(f"{split}-*.tar"))
        if sorted(listed) != present or [s["name"] for s in meta.get("shards", [])] != listed:
            extra, missing = sorted(set(present) - set(listed)), sorted(set(listed) - set(present))
            raise UserError(f"{d}: shard files differ from index.json (missing {missing[:3]}, extra {extra[:3]}); re-run `slotcon shard`")
        if len(rows) != info["num_samples"]:
            raise UserError(f"{mpath}: {len(rows)} rows but index.json says {info['num_samples']} samples")
        by_shard: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_shard.setdefault(r["shard"], []).append(r)
        for smeta in meta["shards"]:
            jobs.append((str(d / smeta["name"]), smeta, by_shard.get(smeta["name"], [])))
    bar = tqdm(total=len(jobs), desc="verify", unit="shard", disable=not progress, dynamic_ncols=True, leave=False)
    try:
        if workers <= 1 or len(jobs) < 2:
            results = (_verify_one(j) for j in jobs)
            for problem in results:
                bar.update()
                if problem:
                    raise UserError(problem)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for problem in pool.map(_verify_one, jobs):
                    bar.update()
                    if problem:
                        raise UserError(problem)
    finally:
        bar.close()
    n = sum(len(j[2]) for j in jobs)
    print(f"shard --verify: {len(jobs)} shards, {n} samples match their manifests")
    return {"shards": len(jobs), "samples": n}


def _run_stage(ctx) -> dict[str, Any]:
    return run_shard(ctx.cfg, ctx.args.raw, ctx.args.out, tracker=ctx.tracker, progress=not ctx.args.no_progress)


STAGE = Stage(
    name="shard", section="shard", run=_run_stage, metrics="metrics/shard.json", headline=("samples", "shards"),
    args=(Arg("raw", "data/raw", "output of `slotcon prepare`"),
          Arg("out", "data/shards", "shard folder"),
          Arg("verify", False, "only re-read the shards under --out and check them", flag=True),
          Arg("no_progress", False, "no progress bar", flag=True)),
    aside=("verify", lambda cfg, args: verify_shards(args.out, workers=cfg.workers, progress=not args.no_progress)),
)
