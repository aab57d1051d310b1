"""Reading what ``shard`` wrote: ``index.json`` (the mark of a complete run), shard URLs, per-shard sample counts, and
``--verify`` (re-read every shard and compare it with its manifest).

A shards root is a local folder or an fsspec URL (``s3://bucket/prefix``, ``file:///abs/path``, ``memory://x``):
URLs are joined with ``/`` and read through fsspec; :func:`shards_root` picks the root a stage reads.
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

from components.config import parse_section, read_params
from components.data.workers import Meter, run_bounded, worker_pool
from components.errors import UserError

INDEX_NAME = "index.json"
LOCAL_ROOT = "data/shards"  # the shard stage's output folder (``--out``/``--shards`` default)


def shards_root(given: str | os.PathLike, params: str | os.PathLike = "params.yaml") -> str:
    """The shards root a stage reads: ``--shards`` as given, except that the default local root (``data/shards``)
    reads from ``shard.url`` of ``params`` when that is set (the object-storage copy the shard stage uploaded)."""
    if os.path.normpath(str(given)) != LOCAL_ROOT:
        return str(given)
    section = read_params(params).get("shard")
    url = parse_section("shard", section, params).url if section is not None else ""
    return url or str(given)


def is_url(root: str | os.PathLike) -> bool:
    """Whether ``root`` is an fsspec URL (``scheme://...``) rather than a local path."""
    return "://" in str(root)


def join_root(root: str | os.PathLike, *parts: str) -> str:
    """``root/part/...``: joined with ``/`` for a URL (no normalisation of the scheme's ``//``), as a path otherwise."""
    if is_url(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return str(Path(root, *parts))


def url_fs(url: str):
    """``(fsspec filesystem, path)`` of ``url``; a protocol whose driver is missing (``s3://`` without s3fs) or that
    fsspec does not know is a one-line UserError naming the URL and the fix."""
    import fsspec  # lazy: fsspec (~0.1 s) only for shard roots in object storage
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise UserError(f"{url}: reading {url.split('://')[0]}:// URLs needs its fsspec driver ({exc}); "
                        "pip install -e '.[stack]'") from None
    except ValueError as exc:
        raise UserError(f"{url}: not a URL fsspec can read ({exc})") from None


def read_root_file(path: str) -> bytes | None:
    """The bytes of a file under a shards root (local path or URL); None when it does not exist. Any other failure
    to read (no connection, refused credentials) is a one-line UserError naming the file."""
    if not is_url(path):
        p = Path(path)
        return p.read_bytes() if p.is_file() else None
    fs, fpath = url_fs(path)
    try:
        with fs.open(fpath, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - every driver has its own errors; each is this file's problem
        raise UserError(f"{path}: cannot read ({exc_line(exc)})") from None


def exc_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 160 characters of it): a driver's error inside a one-line error."""
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def read_index(shards_root: str | os.PathLike) -> dict[str, Any]:
    """``<shards_root>/index.json`` (written last by ``shard``: the mark of a complete run). Missing, not JSON, keys
    missing or of the wrong type, a shard path outside ``shards_root``: one-line UserError naming the file."""
    path = join_root(shards_root, INDEX_NAME)
    data = read_root_file(path)
    if data is None:
        raise UserError(f"{path}: not found: the shard stage has not completed; run `slotcon shard` (or `dvc repro shard`)")
    try:
        index = json.loads(data.decode("utf-8"))
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
        raise UserError(f"{join_root(shards_root, INDEX_NAME)}: no split {split!r} (have: {', '.join(index['splits'])})")
    return [join_root(shards_root, s) for s in index["splits"][split]["shards"]]


def expected_counts(shards_root: str | os.PathLike, split: str) -> dict[str, int]:
    """``{shard path: number of samples written}`` of ``split`` (from index.json): a reader that finds fewer in a shard
    lost the rest (Python's tarfile ends silently at a damaged header), so the loader counts the difference."""
    index = read_index(shards_root)
    info = index["splits"].get(split)
    if info is None:
        raise UserError(f"{join_root(shards_root, INDEX_NAME)}: no split {split!r} (have: {', '.join(index['splits'])})")
    counts = info.get("shard_samples")
    if counts is None or len(counts) != len(info["shards"]):
        raise UserError(f"{join_root(shards_root, INDEX_NAME)}: no per-shard sample counts (written by an older "
                        "`slotcon shard`); re-run `slotcon shard`")
    return {join_root(shards_root, s): int(n) for s, n in zip(info["shards"], counts)}


_IDENTITY_CACHE: dict[str, tuple[Any, dict[str, tuple[str, int | None]]]] = {}


def _identity_table(root: str | os.PathLike) -> dict[str, tuple[str, int | None]]:
    """``{shard path or URL: (sha256, samples)}`` of every shard whose digest ``root``'s index.json records."""
    table: dict[str, tuple[str, int | None]] = {}
    for info in read_index(root)["splits"].values():
        digests, counts = info.get("shard_sha256"), info.get("shard_samples")
        if digests is None:
            continue
        for i, rel in enumerate(info["shards"]):
            key = join_root(root, rel) if is_url(root) else os.path.normpath(join_root(root, rel))
            table[key] = (digests[i], counts[i] if counts is not None else None)
    return table


def shard_identity(url: str) -> tuple[str, int | None] | None:
    """``(sha256, samples)`` that the ``index.json`` of a shard's shards root (the shard folder's parent) records for
    it; None for a URL that is not such a shard (``pipe:``, no index / no digest recorded for it).

    Read once per process and index file (cached by its size and mtime; a remote one by what its filesystem's ``info``
    reports: size, ETag, modification time), so visits cost a dict lookup (and, for a remote index, one ``info``)."""
    if url.startswith("pipe:") or (url.startswith("file:") and not is_url(url)):
        return None
    if is_url(url):
        root = url.rsplit("/", 2)[0]
        fs, ipath = url_fs(join_root(root, INDEX_NAME))
        try:
            info = fs.info(ipath)
        except OSError:  # FileNotFoundError included: no index, nothing recorded
            return None
        stamp = tuple(str(info.get(k)) for k in ("size", "ETag", "LastModified", "mtime", "created"))
        cached = _IDENTITY_CACHE.get(root)
        if cached is None or cached[0] != stamp:
            cached = _IDENTITY_CACHE[root] = (stamp, _identity_table(root))
        return cached[1].get(url)
    shard = Path(os.path.normpath(os.path.abspath(url)))
    root_path = shard.parent.parent
    path = root_path / INDEX_NAME
    try:
        st = path.stat()
    except OSError:
        return None
    stamp = (st.st_size, st.st_mtime_ns)
    cached = _IDENTITY_CACHE.get(str(path))
    if cached is None or cached[0] != stamp:
        cached = _IDENTITY_CACHE[str(path)] = (stamp, _identity_table(root_path))
    return cached[1].get(str(shard))


def shard_members(url: str) -> dict[str, dict[str, str]]:
    """``{key: {member extension: sha1}}`` of a shard (local or URL) as its split's ``manifest.parquet`` lists it (what
    was written into it); empty when there is no manifest. Read only for a shard whose sha256 differs, to keep its
    intact samples and drop the rest."""
    cols = ["key", "shard", "sha1", "json_sha1", "seg_sha1"]
    if is_url(url):
        folder, name = url.rsplit("/", 1)
        fs, mpath = url_fs(join_root(folder, "manifest.parquet"))
        if not fs.isfile(mpath):
            return {}
        table = pq.read_table(mpath, columns=cols, filters=[("shard", "==", name)], filesystem=fs)
    else:
        shard = Path(os.path.normpath(os.path.abspath(url)))
        local = shard.parent / "manifest.parquet"
        if not local.is_file():
            return {}
        table = pq.read_table(local, columns=cols, filters=[("shard", "==", shard.name)])
    out: dict[str, dict[str, str]] = {}
    for r in table.to_pylist():
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
    algo = "sha256" if "sha256" in smeta else "sha1"  # a manifest of an older writer records the shard's sha1
    if len(data) != smeta["bytes"] or hashlib.new(algo, data).hexdigest() != smeta[algo]:
        return f"{p}: size/{algo} differ from manifest.parquet (shard damaged or rewritten); re-run `slotcon shard`"
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
    shard's size and sha256, member keys, order, offsets, sizes and sha1s. Raises a one-line UserError on the first
    mismatch; returns counts when everything agrees.
    """
    if is_url(shards_root):
        raise UserError(f"{shards_root}: --verify re-reads a local shards folder; verify the folder the shard stage "
                        "wrote (data/shards) before it is uploaded")
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
