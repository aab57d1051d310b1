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
    """``<shards_root>/index.json`` (written last by ``shard``: the mark of a complete run). Missing, not JSON, keys
    missing or of the wrong type, a shard path outside ``shards_root``: one-line UserError naming the file."""
    path = Path(shards_root) / INDEX_NAME
    if not path.is_file():
        raise UserError(f"{path}: not found: the shard stage has not completed; run `slotcon shard` (or `dvc repro shard`)")
    try:
        index = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120]}); re-run `slotcon shard`") from None
    problem = _index_problem(index)
    if problem:
        raise UserError(f"{path}: {problem}; re-run `slotcon shard`")
    return index


_SHA256_LEN = 64


def _index_problem(index: Any) -> str | None:
    """What makes ``index`` unusable (None: nothing): the keys and types readers rely on, and every shard path a
    plain relative path below the shards root (no absolute path, no ``..``)."""
    if not isinstance(index, dict):
        return f"top level must be an object, got {type(index).__name__}"
    splits = index.get("splits")
    if not isinstance(splits, dict):
        return "no 'splits' object"
    listed = index.get("pretrain", [])
    if not isinstance(listed, list) or not all(isinstance(s, str) for s in listed):
        return "'pretrain' must be a list of split names"
    for name, info in splits.items():
        if not isinstance(info, dict):
            return f"splits.{name} must be an object"
        shards = info.get("shards")
        if not isinstance(shards, list) or not all(isinstance(u, str) for u in shards):
            return f"splits.{name}.shards must be a list of paths"
        if not isinstance(info.get("num_samples"), int) or isinstance(info.get("num_samples"), bool):
            return f"splits.{name}.num_samples must be an integer"
        for key, ok in (("shard_samples", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                        ("shard_sha256", lambda v: isinstance(v, str) and len(v) == _SHA256_LEN)):
            values = info.get(key)
            if values is not None and (not isinstance(values, list) or len(values) != len(shards)
                                       or not all(ok(v) for v in values)):
                return f"splits.{name}.{key} must list one {'count' if key == 'shard_samples' else 'sha256'} per shard"
        for u in shards:
            parts = Path(u).parts
            if not u or Path(u).is_absolute() or ".." in parts or "\\" in u or ":" in u:
                return (f"splits.{name}.shards lists {u!r}: shard paths must stay inside the shards root "
                        "(relative, no '..')")
    return None


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


_IDENTITY_CACHE: dict[str, tuple[tuple[int, int], dict[str, tuple[str, int | None]]]] = {}


def shard_identity(url: str) -> tuple[str, int | None] | None:
    """``(sha256, samples)`` that the ``index.json`` of a local shard's shards root (the shard folder's parent)
    records for it; None for a URL that is not such a shard (remote, or no index / no digest recorded for it).

    Read once per process and index file (cached by its size and mtime), so visits cost a dict lookup."""
    if "://" in url or url.startswith(("pipe:", "file:")):
        return None
    shard = Path(os.path.normpath(os.path.abspath(url)))
    root = shard.parent.parent
    path = root / INDEX_NAME
    try:
        st = path.stat()
    except OSError:
        return None
    stamp = (st.st_size, st.st_mtime_ns)
    cached = _IDENTITY_CACHE.get(str(path))
    if cached is None or cached[0] != stamp:
        table: dict[str, tuple[str, int | None]] = {}
        for info in read_index(root)["splits"].values():
            digests, counts = info.get("shard_sha256"), info.get("shard_samples")
            if digests is None:
                continue
            for i, rel in enumerate(info["shards"]):
                table[os.path.normpath(str(root / rel))] = (digests[i], counts[i] if counts is not None else None)
        cached = _IDENTITY_CACHE[str(path)] = (stamp, table)
    return cached[1].get(str(shard))


def shard_members(url: str) -> dict[str, dict[str, str]]:
    """``{key: {member extension: sha1}}`` of a local shard as its split's ``manifest.parquet`` lists it (what was
    written into it); empty when there is no manifest. Read only for a shard whose sha256 differs, to keep its
    intact samples and drop the rest."""
    shard = Path(os.path.normpath(os.path.abspath(url)))
    mpath = shard.parent / "manifest.parquet"
    if not mpath.is_file():
        return {}
    cols = ["key", "shard", "sha1", "json_sha1", "seg_sha1"]
    rows = pq.read_table(mpath, columns=cols, filters=[("shard", "==", shard.name)]).to_pylist()
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        out[r["key"]] = {"jpg": r["sha1"], "json": r["json_sha1"]}
        if r["seg_sha1"] is not None:
            out[r["key"]]["seg.png"] = r["seg_sha1"]
    return out


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
