"""``prepare`` for image trees (``data.source: imagenet | folder``): check the walked files in parallel parts that a
killed run resumes, drop duplicates, write each split's manifest by streaming (never all records in memory).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.data.prepare.images import probe_image
from components.data.prepare.manifest import (
    MANIFEST_FIELDS, MAX_LISTED, add_totals, print_skips, root_ref, slotcon_schema,
)
from components.data.prepare.sources import TreeSource, TreeSplit, path_id, tree_source
from components.data.workers import Meter, hold_output, log_run, run_bounded, worker_pool
from components.errors import UserError
from components.io import atomic_open, write_json_atomic

CHUNK = 1024  # files per part: the unit of parallel work and of resume (ImageNet: ~1250 parts of ~100 KB)
PART_VERSION = 1  # bump when a part's content would change for the same files (then nothing stale is reused)
PART_COLUMNS = ("key", "id", "file_name", "width", "height", "mode", "format", "orientation", "bytes", "sha1",
                "label", "label_name", "transcode", "reason", "detail")


def _part_schema():
    return pa.schema([
        ("key", pa.string()), ("id", pa.int64()), ("file_name", pa.string()), ("width", pa.int32()),
        ("height", pa.int32()), ("mode", pa.string()), ("format", pa.string()), ("orientation", pa.int32()),
        ("bytes", pa.int64()), ("sha1", pa.string()), ("label", pa.int32()), ("label_name", pa.string()),
        ("transcode", pa.bool_()), ("reason", pa.string()), ("detail", pa.string()),
    ])


def manifest_schema(meta: dict[str, Any] | None = None):
    """The manifest of a tree source: COCO's columns, then ``label``/``label_name`` (ImageNet class id and wnid; null
    for folders), ``format``, ``orientation`` (EXIF, 1-8) and ``transcode`` (the shard stage stores a transcoded
    JPEG). ``file_name`` is relative to the split's image folder, ``width``/``height`` are as displayed."""
    return slotcon_schema(MANIFEST_FIELDS + [
        ("label", pa.int32()), ("label_name", pa.string()), ("format", pa.string()), ("orientation", pa.int32()),
        ("transcode", pa.bool_()),
    ], meta)


# --------------------------------------------------------------------------------------------------------------------
# parts: checked in worker processes, reused when unchanged
# --------------------------------------------------------------------------------------------------------------------
def _chunks(split: TreeSplit, counts: dict[str, int], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for e in split.entries(counts):
        if e["reason"] is None:
            e["key"], e["id"] = split.key(e["rel"]), path_id(e["rel"])
        chunk.append(e)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _fingerprint(chunk: list[dict[str, Any]], non_jpeg: str) -> str:
    desc = [PART_VERSION, non_jpeg] + [
        [e["rel"], e.get("size"), e.get("mtime_ns"), e.get("label"), e.get("label_name"), e["reason"]] for e in chunk
    ]
    return hashlib.sha1(json.dumps(desc).encode()).hexdigest()


def _part_fingerprint(path: Path) -> str | None:
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # absent or damaged: check the part again
        return None
    return meta.get(b"fingerprint", b"").decode() or None


def check_part(task: dict[str, Any]) -> tuple[int, int]:
    """Check one part's files and write ``task["part"]`` atomically (runs in a worker). Returns (files, bytes)."""
    rows = []
    for e in task["entries"]:
        row = dict.fromkeys(PART_COLUMNS)
        row.update(file_name=e["rel"], label=e.get("label"), label_name=e.get("label_name"), transcode=False)
        if e["reason"] is not None:
            row.update(reason=e["reason"], detail=e["detail"])
        else:
            res = probe_image(os.path.join(task["base"], e["rel"]), task["non_jpeg"])
            row.update(key=e["key"], id=e["id"], **{k: res[k] for k in (
                "width", "height", "mode", "format", "orientation", "bytes", "sha1", "transcode", "reason", "detail")})
        rows.append(row)
    schema = _part_schema().with_metadata({"fingerprint": task["fingerprint"]})
    with atomic_open(task["part"], "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), f, compression="zstd")
    return len(rows), sum(r["bytes"] or 0 for r in rows)


def _check_split(cfg, src: TreeSource, split: TreeSplit, part_dir: Path, pool, meter: Meter,
                 chunk: int) -> tuple[list[Path], dict[str, int], int]:
    """Stream the split's parts through the pool; returns (part paths in order, walk counts, parts reused)."""
    part_dir.mkdir(parents=True, exist_ok=True)
    parts: list[Path] = []
    counts: dict[str, int] = {}
    reused = 0

    def tasks():
        nonlocal reused
        for i, entries in enumerate(_chunks(split, counts, chunk)):
            part = part_dir / f"part-{i:06d}.parquet"
            parts.append(part)
            fp = _fingerprint(entries, cfg.non_jpeg)
            if _part_fingerprint(part) == fp:  # finished by an earlier (killed) run on the same files
                reused += 1
                meter.update(len(entries), sum(e.get("size") or 0 for e in entries))
                continue
            yield {"part": str(part), "fingerprint": fp, "base": str(src.base), "entries": entries,
                   "non_jpeg": cfg.non_jpeg}

    for n, nbytes in run_bounded(pool, check_part, tasks(), in_flight=2 * max(1, cfg.workers)):
        meter.update(n, nbytes)
    keep = {p.name for p in parts}
    for stale in part_dir.glob("part-*.parquet"):  # from an earlier run over more files
        if stale.name not in keep:
            stale.unlink()
    return parts, counts, reused


# --------------------------------------------------------------------------------------------------------------------
# finalize: duplicates (pass 1), the manifest (pass 2)
# --------------------------------------------------------------------------------------------------------------------
def _later_in_groups(tbl, col: str) -> dict[int, int]:
    """``{pos: first pos}`` for every row whose ``col`` value appeared at an earlier position (Arrow group-by)."""
    if tbl.num_rows == 0:
        return {}
    g = tbl.group_by(col).aggregate([("pos", "min"), ("pos", "count")])
    g = g.filter(pc.greater(g["pos_count"], 1))
    if g.num_rows == 0:
        return {}
    first = dict(zip(g[col].to_pylist(), g["pos_min"].to_pylist()))
    sub = tbl.filter(pc.is_in(tbl[col], value_set=g[col]))
    return {p: first[v] for v, p in zip(sub[col].to_pylist(), sub["pos"].to_pylist()) if p != first[v]}


def _scan_parts(parts: list[Path]) -> tuple[Any, Counter, list[dict[str, Any]], list[int]]:
    """Pass 1: (key/id/sha1/pos of usable rows, skip counts by reason, listed failures, part start positions)."""
    tables, reasons, failures, starts, offset = [], Counter(), [], [], 0
    for p in parts:
        t = pq.read_table(p, columns=["key", "id", "sha1", "reason", "file_name", "detail"])
        starts.append(offset)
        t = t.append_column("pos", pa.array(range(offset, offset + t.num_rows), pa.int64()))
        offset += t.num_rows
        bad = t.filter(pc.is_valid(t["reason"]))
        if bad.num_rows:
            reasons.update(bad["reason"].to_pylist())
            if len(failures) < MAX_LISTED:
                failures += [{"file": r["file_name"], "id": None, "reason": r["reason"], "detail": r["detail"]}
                             for r in bad.select(["file_name", "reason", "detail"]).to_pylist()]
        tables.append(t.filter(pc.is_null(t["reason"])).select(["key", "id", "sha1", "pos"]))
    ok = pa.concat_tables(tables) if tables else pa.table({"key": [], "id": [], "sha1": [], "pos": []})
    return ok, reasons, failures, starts


def _names_at(parts: list[Path], starts: list[int], positions: set[int]) -> dict[int, str]:
    """File names at global row positions (read from only the parts that hold them)."""
    by_part: dict[int, list[int]] = {}
    for pos in positions:
        by_part.setdefault(bisect.bisect_right(starts, pos) - 1, []).append(pos)
    out: dict[int, str] = {}
    for i, poss in by_part.items():
        names = pq.read_table(parts[i], columns=["file_name"])["file_name"]
        out.update({p: names[p - starts[i]].as_py() for p in poss})
    return out


def _without(tbl, positions):
    return tbl.filter(pc.invert(pc.is_in(tbl["pos"], value_set=_pos_array(positions)))) if positions else tbl


def _duplicates(cfg, ok, earlier_sha1) -> tuple[dict[int, tuple[str, int]], dict[int, int], list[int]]:
    """Rows to drop ``{pos: (reason, first pos)}`` (same key, same id, then -- with ``data.duplicates: skip`` -- same
    bytes as an earlier row), content duplicates kept ``{pos: first}`` (``keep``), and the positions of rows whose
    bytes an earlier split already holds (kept and reported: e.g. ImageNet val images that also occur in train)."""
    drop: dict[int, tuple[str, int]] = {}
    for col, reason in (("key", "duplicate_key"), ("id", "duplicate_id")):
        drop.update({p: (reason, f) for p, f in _later_in_groups(_without(ok, drop), col).items()})
    later = _later_in_groups(_without(ok, drop), "sha1")
    kept: dict[int, int] = {}
    if cfg.duplicates == "skip":
        drop.update({p: ("duplicate", f) for p, f in later.items()})
    else:
        kept = later
    return drop, kept, _cross(_without(ok, drop), earlier_sha1)


def _pos_array(positions):
    return pa.array(sorted(positions), pa.int64())


def _cross(rest, earlier_sha1) -> list[int]:
    if earlier_sha1 is None or rest.num_rows == 0:
        return []
    return rest.filter(pc.is_in(rest["sha1"], value_set=earlier_sha1))["pos"].to_pylist()


def _write_manifest(path: Path, parts: list[Path], drop: dict[int, Any], meta: dict[str, Any]) -> None:
    """Pass 2: the usable, non-dropped rows of every part, in walk order, one row group per part."""
    schema = manifest_schema(meta)
    dropped = np.array(sorted(drop), np.int64)
    offset = 0
    with atomic_open(path, "wb") as f:
        with pq.ParquetWriter(f, schema, compression="zstd") as writer:
            for p in parts:
                t = pq.read_table(p)
                pos = np.arange(offset, offset + t.num_rows)
                offset += t.num_rows
                keep = np.asarray(pc.is_null(t["reason"])) & ~np.isin(pos, dropped)
                t = t.filter(pa.array(keep))
                cols = {name: t[name] for name in schema.names if name in t.column_names}
                cols["num_annotations"] = pa.array(np.zeros(t.num_rows, np.int32))
                cols["seg_file"] = pa.nulls(t.num_rows, pa.string())
                writer.write_table(pa.table([cols[n] for n in schema.names], schema=schema))


def _finalize_split(cfg, src: TreeSource, split: TreeSplit, parts: list[Path], walk_counts: dict[str, int],
                    out_dir: Path, earlier_sha1):
    """Duplicates, counts, the manifest; returns (split metrics, index entry, this split's sha1 column).

    Pass 1 reads only key/id/sha1 columns to find duplicates (Arrow group-by; the first in walk order is kept), pass 2
    writes ``<out>/<source>/<split>/manifest.parquet`` row group by row group. Skips are counted by reason (walk:
    see :func:`~components.data.prepare.sources.walk_images`; check: see
    :func:`~components.data.prepare.images.probe_image`; dedup: ``duplicate_key``, ``duplicate_id``, ``duplicate``),
    listed (up to ``MAX_LISTED``) in the manifest metadata, and printed.
    """
    ok, reasons, failures, starts = _scan_parts(parts)
    drop, kept_dups, cross = _duplicates(cfg, ok, earlier_sha1)
    names = _names_at(parts, starts, set(drop) | {f for _, f in drop.values()} | set(kept_dups)
                      | set(kept_dups.values()) | set(cross[:100]))
    for pos, (reason, first) in sorted(drop.items()):
        reasons[reason] += 1
        if len(failures) < MAX_LISTED:
            failures.append({"file": names[pos], "id": None, "reason": reason, "detail": f"same as {names[first]}"})
    for pos, first in sorted(kept_dups.items())[:MAX_LISTED]:
        failures.append({"file": names[pos], "id": None, "reason": "duplicate", "detail": f"same bytes as "
                         f"{names[first]}", "image_kept": True})
    n_ok = ok.num_rows - len(drop)
    by_reason = dict(sorted(reasons.items()))
    if n_ok == 0:
        where = src.base / split.name if src.source == "imagenet" else src.root
        raise UserError(f"{where}: none of the {sum(reasons.values())} files of split {split.name} is a usable image "
                        f"({by_reason}); check data.root / data.include")
    split_metrics = {
        "images": n_ok, "skipped": sum(reasons.values()), "skipped_by_reason": by_reason,
        "excluded": walk_counts.get("excluded", 0), "duplicates_kept": len(kept_dups),
        "same_bytes_as_earlier_split": len(cross), "annotations": 0, "with_seg": 0,
    }
    meta = {"source": src.source, "split": split.name, "labeled": False, "counts": split_metrics,
            "failures": sorted(failures, key=lambda f: (f["reason"], f["file"]))[:MAX_LISTED],
            "same_bytes_as_earlier_split": [names[p] for p in cross[:100]]}
    manifest = out_dir / src.source / split.name / "manifest.parquet"
    _write_manifest(manifest, parts, drop, meta)
    stats = pq.read_table(manifest, columns=["bytes", "transcode", "label"])
    split_metrics.update(bytes=int(pc.sum(stats["bytes"]).as_py() or 0),
                         transcode=int(pc.sum(stats["transcode"].cast("int64")).as_py() or 0),
                         labeled_images=stats.num_rows - stats["label"].null_count)
    print_skips(split.name, failures)
    image_dir = Path(os.path.relpath(src.base, src.root)).as_posix()
    entry = {"labeled": False, "manifest": f"{src.source}/{split.name}/manifest.parquet",
             "image_dir": "" if image_dir == "." else image_dir, "annotations": None, "annotations_sha1": None,
             "num_images": n_ok, "num_skipped": split_metrics["skipped"]}
    return split_metrics, entry, _without(ok, drop)["sha1"].combine_chunks()


# --------------------------------------------------------------------------------------------------------------------
# the stage's work for tree sources
# --------------------------------------------------------------------------------------------------------------------
def run_prepare_tree(cfg, out_dir: str | os.PathLike, *, tracker=None, progress: bool = True,
                     chunk: int = CHUNK) -> dict[str, Any]:
    """``prepare`` for ``cfg.source`` in (imagenet, folder): manifests + ``index.json`` under ``out_dir``; metrics.

    The walk (:mod:`components.data.prepare.sources`) is a stream cut into parts of ``chunk`` files; worker processes
    check each part's images (:func:`~components.data.prepare.images.probe_image`) and write it as
    ``part-NNNNNN.parquet`` into the work folder beside the output. A part whose files (paths, sizes, mtimes, labels)
    and policy are unchanged is reused (``parts_reused`` in the metrics), so a killed run resumes where it stopped,
    also under ``dvc repro`` (which deletes ``data/raw`` first but not the work folder). Then, per split, two
    streaming passes over the parts find the duplicates and write the manifest (:func:`_finalize_split`).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    src = tree_source(cfg)  # layout errors raise here, before anything is written
    metrics: dict[str, Any] = {"source": cfg.source, "splits": {}}
    index_splits: dict[str, Any] = {}
    reused = 0
    earlier = None
    with hold_output(out_dir, "slotcon prepare") as work, worker_pool(cfg.workers) as pool:
        (out_dir / "index.json").unlink(missing_ok=True)  # nothing looks complete while this run works
        meter = Meter(f"prepare {cfg.source}", progress=progress)
        try:
            for split in src.splits:
                parts, counts, n_reused = _check_split(cfg, src, split, work / cfg.source / split.name, pool, meter,
                                                       chunk)
                reused += n_reused
                m, entry, sha1 = _finalize_split(cfg, src, split, parts, counts, out_dir, earlier)
                earlier = sha1 if earlier is None else pa.concat_arrays([earlier, sha1])
                metrics["splits"][split.name] = m
                index_splits[split.name] = entry
        finally:
            meter.close()
        index = {
            "source": cfg.source, "root": root_ref(src.root, out_dir), "splits": index_splits, "pretrain": src.pretrain,
            "train": "train", "val": src.val, "categories": [], "semantic_classes": None, "classes": src.classes,
            "image_policy": {"non_jpeg": cfg.non_jpeg, "transcode_quality": cfg.transcode_quality,
                             "duplicates": cfg.duplicates},
            "notes": src.notes,
        }
        write_json_atomic(out_dir / "index.json", index)
        shutil.rmtree(work, ignore_errors=True)  # the parts (and the lock file, still held: see hold_output)
    seconds = time.perf_counter() - t0
    add_totals(metrics, seconds)
    metrics.update(mb_per_s=round(meter.bytes / 1e6 / max(seconds, 1e-9), 2), parts_reused=reused,
                   transcode=sum(m["transcode"] for m in metrics["splits"].values()))
    print(f"prepare: {cfg.source}: {metrics['images']} images ok, {metrics['skipped']} skipped, "
          f"{metrics['transcode']} to transcode, {meter.bytes / 1e6:.1f} MB checked in {seconds:.1f} s "
          f"({metrics['img_per_s']:.0f} img/s, {metrics['mb_per_s']:.1f} MB/s)"
          f"{f'; {reused} parts reused from an earlier run' if reused else ''}")
    log_run(tracker, metrics, index, "prepare_index.json")
    return metrics
