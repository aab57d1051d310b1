"""Reading what ``shard`` wrote: ``index.json`` (the mark of a complete run), shard URLs, per-shard sample counts, and
``--verify`` (re-read every shard and compare it with its manifest).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from components.data.workers import Meter, run_bounded, worker_pool
from components.errors import UserError

INDEX_NAME = "index.json"


def read_index(shards_root: str | os.PathLike) -> dict[str, Any]:
    """``<shards_root>/index.json`` (written last by ``shard``: the mark of a complete run); a missing one is a
    one-line UserError."""
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


def _verify_one(args: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> tuple[str | None, int, int]:
    """Re-read one shard and compare it with its manifest rows: (one-line problem or None, samples, bytes)."""
    path, smeta, rows = args
    problem = _check_shard(path, smeta, rows)
    return problem, len(rows), smeta["bytes"]


def _check_shard(path: str, smeta: dict[str, Any], rows: list[dict[str, Any]]) -> str | None:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        return f"{p}: cannot read ({exc})"
    if len(data) != smeta["bytes"] or hashlib.sha1(data).hexdigest() != smeta["sha1"]:
        return f"{p}: size/sha1 differ from manifest.parquet (shard damaged or rewritten); re-run `slotcon shard`"
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


def _verify_jobs(root: Path, index: dict[str, Any]):
    """Per shard: (path, shard metadata, its manifest rows). Streams: one shard's rows are Python objects at a time
    (the manifest lists a split's shards in order, each shard's rows contiguous)."""
    for split, info in index["splits"].items():
        d = root / split
        mpath = d / "manifest.parquet"
        if not mpath.is_file():
            raise UserError(f"{mpath}: not found; the shard stage did not complete; re-run `slotcon shard`")
        table = pq.read_table(mpath)
        meta = json.loads((table.schema.metadata or {}).get(b"slotcon", b"{}"))
        leftovers = sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))
        if leftovers:
            raise UserError(f"{d / leftovers[0]}: leftover temporary file of an interrupted write; re-run `slotcon shard`")
        listed = [Path(s).name for s in info["shards"]]
        present = sorted(p.name for p in d.glob(f"{split}-*.tar"))
        if sorted(listed) != present or [s["name"] for s in meta.get("shards", [])] != listed:
            extra, missing = sorted(set(present) - set(listed)), sorted(set(listed) - set(present))
            raise UserError(f"{d}: shard files differ from index.json (missing {missing[:3]}, extra {extra[:3]}); re-run `slotcon shard`")
        if table.num_rows != info["num_samples"] or sum(s["num_samples"] for s in meta["shards"]) != table.num_rows:
            raise UserError(f"{mpath}: {table.num_rows} rows but index.json says {info['num_samples']} samples")
        start = 0
        for smeta in meta["shards"]:
            yield str(d / smeta["name"]), smeta, table.slice(start, smeta["num_samples"]).to_pylist()
            start += smeta["num_samples"]


def verify_shards(shards_root: str | os.PathLike, *, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Re-read every shard and check it against ``index.json`` and the split manifests.

    Checks: index present (the run completed), no leftover temporary files, exactly the listed shard files, each
    shard's size and sha1, member keys, order, offsets, sizes and sha1s. Raises a one-line UserError on the first
    mismatch; returns counts when everything agrees.
    """
    root = Path(shards_root)
    index = read_index(root)
    total = sum(len(info["shards"]) for info in index["splits"].values())
    meter = Meter("verify", total, progress=progress)
    shards = samples = 0
    try:
        with worker_pool(workers if total > 1 else 1) as pool:
            for problem, n, nbytes in run_bounded(pool, _verify_one, _verify_jobs(root, index), 2 * max(1, workers)):
                if problem:
                    raise UserError(problem)
                shards += 1
                samples += n
                meter.update(n, nbytes)
    finally:
        meter.close()
    print(f"shard --verify: {shards} shards, {samples} samples match their manifests")
    return {"shards": shards, "samples": samples}
