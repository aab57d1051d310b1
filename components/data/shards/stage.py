"""Stage ``shard``: WebDataset tar shards with the original image bytes, a Parquet manifest per split, and
``--verify``. Shards are written in parallel and resumably, and are byte-identical for the same input, however the run
was interrupted or how many workers wrote them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.data.prepare.coco import load_instances
from components.data.prepare.manifest import resolve_root, slotcon_schema
from components.data.shards.index import (  # noqa: F401  (re-exported: the readers' API)
    INDEX_NAME, exc_line, expected_counts, read_index, split_urls, url_fs, verify_shards,
)
from components.data.shards.write import (
    done_name, dump_meta, find_finished, finish_shard, member_span, read_records, shard_name, write_shard,
)
from components.data.workers import NO_PROGRESS, Meter, hold_output, log_run, run_bounded, stage_run, worker_pool
from components.errors import UserError
from components.io import atomic_open, sha1_file, write_json_atomic
from components.stage import Arg, Stage

SHARD_VERSION = 2  # part of every shard's fingerprint: bump when the same input would give different bytes
TAR_END = 2 * 10240  # end-of-archive blocks + record padding


# --------------------------------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------------------------------
def _split_seed(seed: int, split: str) -> list[int]:
    return [seed, zlib.crc32(split.encode())]


def cut_shards(sizes, max_count: int, max_bytes: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each shard over a stream of sample sizes: at most ``max_count`` samples and ``max_bytes``
    bytes (a shard holds at least one sample even if that one is larger). Depends on nothing but the sizes, so every
    shard can be written by an independent process and the cut never depends on the number of workers."""
    start = n = 0
    cur = TAR_END
    for i, size in enumerate(sizes):
        if n and (n >= max_count or cur + size > max_bytes):
            yield start, i
            start, n, cur = i, 0, TAR_END
        n += 1
        cur += size
    if n:
        yield start, start + n


def plan_shards(items: list[dict[str, Any]], max_count: int, max_bytes: int) -> list[list[dict[str, Any]]]:
    """:func:`cut_shards` over a list of ``{"size": ...}`` items -> the items of each shard."""
    return [items[a:b] for a, b in cut_shards((it["size"] for it in items), max_count, max_bytes)]


def _group_annotations(path: Path) -> tuple[dict[int, dict], dict[int, list[dict]]]:
    data = load_instances(path, "coco")
    images = {r["id"]: r for r in data["images"] if isinstance(r, dict) and "id" in r}
    anns: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        anns.setdefault(a.get("image_id"), []).append(a)
    for lst in anns.values():
        lst.sort(key=lambda a: (a.get("id", 0)))
    return images, anns


@dataclass
class SplitPlan:
    """One split, planned: its manifest rows in write order (Arrow), where each shard starts and ends, and what
    turns a row into a sample (annotations, folders, transcode quality)."""

    split: str
    labeled: bool
    table: Any  # pyarrow.Table, rows sorted by key then permuted by the seed
    image_dir: Path
    root: Path
    quality: int
    images: dict[int, dict] = field(default_factory=dict)
    anns: dict[int, list[dict]] = field(default_factory=dict)
    cuts: list[tuple[int, int]] = field(default_factory=list)

    def meta(self, r: dict[str, Any]) -> bytes:
        record = self.images.get(r["id"]) or {
            "id": r["id"], "file_name": r["file_name"], "width": r["width"], "height": r["height"],
        }
        if r.get("label") is not None:  # ImageNet: the class, for later probes (pretraining never reads it)
            record = {**record, "label": r["label"], "label_name": r["label_name"]}
        return dump_meta({"image": record, "annotations": self.anns.get(r["id"], [])})

    def samples(self, a: int, b: int) -> list[dict[str, Any]]:
        out = []
        for r in self.table.slice(a, b - a).to_pylist():
            out.append({
                "key": r["key"], "id": r["id"], "image": str(self.image_dir / r["file_name"]), "sha1": r["sha1"],
                "meta": self.meta(r), "seg": str(self.root / r["seg_file"]) if r["seg_file"] else None,
                "num_annotations": r["num_annotations"], "width": r["width"], "height": r["height"],
                "transcode": bool(r.get("transcode")),
            })
        return out

    def sizes(self) -> Iterator[int]:
        """Each row's bytes in the tar (source file size for the image), streamed in record batches."""
        for batch in self.table.to_batches(max_chunksize=4096):
            for r in batch.to_pylist():
                seg = member_span(os.path.getsize(self.root / r["seg_file"])) if r["seg_file"] else 0
                yield member_span(r["bytes"]) + member_span(len(self.meta(r))) + seg


def plan_split(cfg, raw_dir: Path, raw_index: dict[str, Any], root: Path, split: str) -> SplitPlan:
    """Read one split's manifest (and annotations), order it, cut it into shards. Input problems are UserErrors.

    Determinism (DVC hashes must not change on a re-run): samples are sorted by key and shuffled once by
    ``shard.seed`` (so a shard holds a random mix and the loader's small shuffle buffer suffices), and shards are cut
    at ``max_count`` samples or ``max_bytes`` bytes counted with the source files' sizes (so the cut is known before
    any transcode). The manifest stays columnar Arrow: one shard's sample list is made at a time.
    """
    info = raw_index["splits"][split]
    mpath = raw_dir / info["manifest"]
    if not mpath.is_file():
        raise UserError(f"{mpath}: not found; re-run `slotcon prepare`")
    table = pq.read_table(mpath)
    quality = int((raw_index.get("image_policy") or {}).get("transcode_quality", 95))
    plan = SplitPlan(split, bool(info["labeled"]), table, root / info["image_dir"], root, quality)
    if info.get("annotations"):
        ann_path = root / info["annotations"]
        if not ann_path.is_file():
            raise UserError(f"{ann_path}: not found (prepare saw it); re-run `slotcon prepare`")
        if info.get("annotations_sha1") and sha1_file(ann_path) != info["annotations_sha1"]:
            raise UserError(f"{ann_path}: changed since `slotcon prepare` (sha1 differs); re-run prepare")
        plan.images, plan.anns = _group_annotations(ann_path)
    # sorted by key, then shuffled once at write time, seeded per split: shards are random mixes, order reproducible
    order = pc.sort_indices(table, sort_keys=[("key", "ascending")]).to_numpy()
    perm = np.random.default_rng(_split_seed(cfg.seed, split)).permutation(len(order))
    plan.table = table.take(order[perm])
    plan.cuts = list(cut_shards(plan.sizes(), cfg.max_count, cfg.max_bytes))
    return plan


def _fingerprint(name: str, quality: int, samples: list[dict[str, Any]]) -> str:
    """What decides a shard's bytes: its name, the transcode quality and each sample's key, id, image sha1, JSON
    and semantic map (path and size; prepare checked its content)."""
    desc = [SHARD_VERSION, name, quality] + [
        [s["key"], s["id"], s["sha1"], hashlib.sha1(s["meta"]).hexdigest(), s["transcode"],
         [os.path.basename(s["seg"]), os.path.getsize(s["seg"])] if s["seg"] else None] for s in samples
    ]
    return hashlib.sha1(json.dumps(desc).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# writing (parallel, resumable) and putting in place
# --------------------------------------------------------------------------------------------------------------------
def _tasks(plans: list[SplitPlan], work: Path, out_dir: Path, summaries: dict, meter: Meter,
           defer_sync: bool) -> Iterator[dict]:
    """One write task per shard still to write, built when the pool asks for it; finished ones are only recorded."""
    for plan in plans:
        (work / plan.split).mkdir(parents=True, exist_ok=True)
        for i, (a, b) in enumerate(plan.cuts):
            name = shard_name(plan.split, i)
            samples = plan.samples(a, b)
            fp = _fingerprint(name, plan.quality, samples)
            done = work / plan.split / done_name(name)
            found = find_finished(done, fp, [work / plan.split / name, out_dir / plan.split / name])
            if found is not None:  # written by an earlier run that was killed: keep it
                summaries[(plan.split, i)] = {**found, "reused": True}
                meter.update(found["num_samples"], found["bytes"])
                continue
            yield {"path": str(work / plan.split / name), "samples": samples, "quality": plan.quality,
                   "fingerprint": fp, "done": str(done), "split": plan.split, "index": i,
                   "defer_sync": defer_sync}


def _write_all(cfg, plans: list[SplitPlan], work: Path, out_dir: Path, progress: bool,
               on_sample: Callable[[int], None] | None) -> tuple[dict, dict[str, float]]:
    """Every shard still to write: the writer processes write and close them, this process's threads fsync, rename
    and record each (:func:`finish_shard`) while the next ones are written. With the ``on_sample`` test hook, all in
    this process and in order."""
    total = sum(p.table.num_rows for p in plans)
    meter = Meter("shard", total, progress=progress)
    summaries: dict[tuple[str, int], dict[str, Any]] = {}
    fn = partial(write_shard, on_sample=on_sample) if on_sample is not None else write_shard
    stats = {"samples": 0, "bytes": 0, "seconds": 0.0}

    def record(s: dict[str, Any]) -> None:
        summaries[(s["split"], s["index"])] = {**s, "path": str(work / s["split"] / s["name"]), "reused": False}
        meter.update(s["num_samples"], s["bytes"])
        stats["samples"] += s["num_samples"]
        stats["bytes"] += s["bytes"]

    t = time.perf_counter()
    tasks = _tasks(plans, work, out_dir, summaries, meter, defer_sync=on_sample is None)
    try:
        with worker_pool(1 if on_sample is not None else cfg.workers) as pool, \
                ThreadPoolExecutor(max(2, cfg.workers), thread_name_prefix="shard-sync") as syncer:
            finishing: list[Future] = []
            for w in run_bounded(pool, fn, tasks, 2 * cfg.workers):
                if on_sample is not None:
                    record(w)
                    continue
                finishing.append(syncer.submit(finish_shard, w))
                while finishing and (finishing[0].done() or len(finishing) > 2 * cfg.workers):
                    record(finishing.pop(0).result())
            for f in finishing:
                record(f.result())
    except BaseException:  # shards written but never finished (and half ones) leave no temporary file behind
        for plan in plans:
            for p in (work / plan.split).glob(f".{plan.split}-*.tar.tmp"):
                p.unlink(missing_ok=True)
        raise
    finally:
        meter.close()
    stats["seconds"] = time.perf_counter() - t
    return summaries, stats


SHARD_MANIFEST_COLUMNS = (
    "key", "id", "shard", "index", "offset", "bytes", "sha1", "source_sha1", "transcoded", "json_bytes", "json_sha1",
    "seg_bytes", "seg_sha1", "num_annotations", "width", "height",
)


def _shard_manifest_schema(meta: dict[str, Any]):
    return slotcon_schema(
        [("key", pa.string()), ("id", pa.int64()), ("shard", pa.string()), ("index", pa.int32()),
         ("offset", pa.int64()), ("bytes", pa.int64()), ("sha1", pa.string()), ("source_sha1", pa.string()),
         ("transcoded", pa.bool_()), ("json_bytes", pa.int64()), ("json_sha1", pa.string()),
         ("seg_bytes", pa.int64()), ("seg_sha1", pa.string()), ("num_annotations", pa.int32()),
         ("width", pa.int32()), ("height", pa.int32())],
        meta,
    )


def _write_shard_manifest(path: Path, shards: list[dict[str, Any]], work_split: Path, meta: dict[str, Any]) -> None:
    """The split's manifest, streamed shard by shard from the done-records (rows of a shard are contiguous)."""
    schema = _shard_manifest_schema(meta)
    with atomic_open(path, "wb") as f:
        with pq.ParquetWriter(f, schema, compression="zstd") as writer:
            for s in shards:
                records = read_records(work_split / done_name(s["name"]))
                writer.write_table(pa.Table.from_pylist(records, schema=schema))


def _move_into_place(split: str, shards: list[dict[str, Any]], work: Path, out_dir: Path) -> None:
    """Replace ``out/<split>``'s shards and manifest with the new ones (renames; stale files of the split go)."""
    d = out_dir / split
    d.mkdir(parents=True, exist_ok=True)
    names = {s["name"] for s in shards}
    for p in d.iterdir():
        stale_tar = p.name.startswith(f"{split}-") and p.name.endswith(".tar") and p.name not in names
        if p.name == "manifest.parquet" or stale_tar or (p.name.startswith(f".{split}-") and p.name.endswith(".tmp")):
            p.unlink()
    for s in shards:
        if Path(s["path"]) != d / s["name"]:
            os.replace(s["path"], d / s["name"])
    os.replace(work / split / "manifest.parquet", d / "manifest.parquet")


def _finalize(plans: list[SplitPlan], summaries: dict, work: Path, out_dir: Path,
              raw_index: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Manifests (in the work folder), then every rename into ``out``, then ``index.json`` (last): its presence marks
    a complete run."""
    index_splits: dict[str, Any] = {}
    split_metrics: dict[str, Any] = {}
    per_split = {p.split: [summaries[(p.split, i)] for i in range(len(p.cuts))] for p in plans}
    for plan in plans:
        shards = per_split[plan.split]
        shards_meta = [{k: s[k] for k in ("name", "num_samples", "bytes", "sha256")} for s in shards]
        n = sum(s["num_samples"] for s in shards)
        _write_shard_manifest(work / plan.split / "manifest.parquet", shards, work / plan.split, {
            "split": plan.split, "source": raw_index["source"], "labeled": plan.labeled, "num_samples": n,
            "shards": shards_meta,
        })
        nbytes = sum(s["bytes"] for s in shards)
        index_splits[plan.split] = {
            "num_samples": n,
            "shards": [f"{plan.split}/{s['name']}" for s in shards],
            "shard_samples": [s["num_samples"] for s in shards],  # what a reader must find in each shard
            "shard_sha256": [s["sha256"] for s in shards],  # each shard's identity: the loader checks it
            "labeled": plan.labeled,
            "with_seg": plan.table.num_rows - plan.table["seg_file"].null_count,
            "bytes": nbytes,
        }
        split_metrics[plan.split] = {"samples": n, "shards": len(shards), "bytes": nbytes}
    for plan in plans:  # renames only from here on: a crash here resumes without rewriting anything
        _move_into_place(plan.split, per_split[plan.split], work, out_dir)
    index = {
        "source": raw_index["source"], "splits": index_splits, "pretrain": raw_index["pretrain"],
        "train": raw_index["train"], "val": raw_index["val"], "categories": raw_index["categories"],
        "semantic_classes": raw_index["semantic_classes"], "classes": raw_index.get("classes"),
    }
    write_json_atomic(out_dir / INDEX_NAME, index)
    return index, split_metrics


def upload_shards(out_dir: str | os.PathLike, url: str, index: dict[str, Any]) -> dict[str, Any]:
    """Copy the finished shards root ``out_dir`` to ``url`` (``shard.url``): the index there is removed first, then
    every listed shard and each split's manifest are put, and ``index.json`` last, so a reader never sees an index for
    shards not yet there (or a new index beside old shards). Returns ``{"files", "bytes", "seconds"}``."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    fs, base = url_fs(url)
    base = base.rstrip("/")
    rels = [rel for split, info in index["splits"].items() for rel in (*info["shards"], f"{split}/manifest.parquet")]
    nbytes = 0
    try:
        if fs.exists(f"{base}/{INDEX_NAME}"):
            fs.rm(f"{base}/{INDEX_NAME}")
        for rel in [*rels, INDEX_NAME]:
            dest = f"{base}/{rel}"
            fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(out_dir / rel), dest)
            nbytes += (out_dir / rel).stat().st_size
    except Exception as exc:  # noqa: BLE001 - every fsspec driver has its own errors; each is a failed upload
        raise UserError(f"{url}: upload of {out_dir} failed ({exc_line(exc)}); the local shards are complete: "
                        "re-run `slotcon shard` to upload again") from None
    seconds = time.perf_counter() - t0
    print(f"shard: uploaded {len(rels) + 1} files ({nbytes / 1e6:.1f} MB) to {url} in {seconds:.2f} s")
    return {"files": len(rels) + 1, "bytes": nbytes, "seconds": round(seconds, 3)}


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

    Output under ``out_dir``: ``<split>/<split>-NNNNNN.tar`` (samples ``<key>.jpg``, ``<key>.json``, ``<key>.seg.png``
    when a map exists), ``<split>/manifest.parquet`` (key -> shard, index, byte offset, sizes and sha1 of every
    member) and ``index.json``, written last. One process per output folder (a second run stops at once: "held by
    PID ..."). Shards are written into the work folder beside the output, each renamed when complete and followed by a
    done-record, so a run killed at any point (kill -9 included) resumes without rewriting finished shards, also under
    ``dvc repro`` (DVC deletes ``data/shards`` before a run, not the work folder).

    With ``cfg.url`` set, the finished (and verified) root is then uploaded there (:func:`upload_shards`).

    ``cfg`` is the ``shard`` section. ``on_sample`` is a test hook (interruption tests) passed to :func:`write_shard`;
    with it set, shards are written in this process.
    """
    t0 = time.perf_counter()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    raw_index_path = raw_dir / INDEX_NAME
    if not raw_index_path.is_file():
        raise UserError(f"{raw_index_path}: not found; run `slotcon prepare` (or `dvc repro prepare`) first")
    raw_index = json.loads(raw_index_path.read_text())
    root = resolve_root(raw_dir, raw_index)
    if cfg.url:
        url_fs(cfg.url)  # a missing driver (s3:// without s3fs) stops here, before any shard is written
    with hold_output(out_dir, "slotcon shard") as work:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / INDEX_NAME).unlink(missing_ok=True)  # nothing looks complete while this run works
        plans = [plan_split(cfg, raw_dir, raw_index, root, split) for split in raw_index["splits"]]
        summaries, written = _write_all(cfg, plans, work, out_dir, progress, on_sample)
        index, split_metrics = _finalize(plans, summaries, work, out_dir, raw_index)
        shutil.rmtree(work, ignore_errors=True)  # done-records (and the lock file, still held: see hold_output)
    reused = [s for s in summaries.values() if s["reused"]]
    total = sum(m["samples"] for m in split_metrics.values())
    total_bytes = sum(m["bytes"] for m in split_metrics.values())
    write_s = max(written["seconds"], 1e-9)
    metrics: dict[str, Any] = {"source": raw_index["source"], "splits": split_metrics}
    metrics.update(
        samples=total, shards=len(summaries), bytes=total_bytes, seconds=round(time.perf_counter() - t0, 3),
        img_per_s=round(written["samples"] / write_s, 1), mb_per_s=round(written["bytes"] / 1e6 / write_s, 2),
        shards_reused=len(reused), transcoded=sum(s["transcoded"] for s in summaries.values()),
    )
    print(f"shard: {total} samples -> {len(summaries)} shards ({total_bytes / 1e6:.1f} MB); wrote "
          f"{written['samples']} samples in {written['seconds']:.2f} s: {metrics['img_per_s']:.0f} img/s, "
          f"{metrics['mb_per_s']:.1f} MB/s ({cfg.workers} workers)"
          + (f"; {len(reused)} shards kept from an interrupted run" if reused else ""))
    if cfg.verify:
        v = verify_shards(out_dir, workers=cfg.workers, progress=progress)
        metrics["verified_samples"] = v["samples"]
    if cfg.url:
        metrics["upload"] = {"url": cfg.url, **upload_shards(out_dir, cfg.url, index)}
    log_run(tracker, metrics, index, "shards_index.json")
    return metrics


STAGE = Stage(
    name="shard", section="shard", run=stage_run(run_shard, "raw"), metrics="metrics/shard.json",
    headline=("samples", "shards"),
    args=(Arg("raw", "data/raw", "output of `slotcon prepare`"),
          Arg("out", "data/shards", "shard folder"),
          Arg("verify", False, "only re-read the shards under --out and check them", flag=True), NO_PROGRESS),
    aside=("verify", lambda cfg, args: verify_shards(args.out, workers=cfg.workers, progress=not args.no_progress)),
)
