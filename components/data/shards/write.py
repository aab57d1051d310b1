"""Writing one WebDataset shard (in a worker process): its members, fixed tar metadata, the atomic rename, and the
done-record that lets a killed run skip the shards it finished. Every byte is a function of the inputs, so a re-run
(or a resumed run) writes byte-identical shards.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Callable

from components.data.prepare.images import transcode
from components.errors import UserError
from components.io import DiskFullError, is_enospc, write_bytes_atomic

FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: any constant works; the current time would change every shard's bytes
TAR_USER = "slotcon"
TAR_MODE = 0o444
BLOCK = 512  # tar block size: every member is a 512-byte header plus its data padded to 512


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def tmp_name(name: str) -> str:
    return f".{name}.tmp"


def done_name(name: str) -> str:
    return f"{name}.done.json"


def member_span(size: int) -> int:
    """Bytes a member occupies in a USTAR archive: header + data rounded up to the block size."""
    return BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK


def dump_meta(obj: Any) -> bytes:
    """Canonical JSON for the ``json`` member: sorted keys, no whitespace -> the same bytes on every run."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class _HashingFile:
    """Write-through file wrapper that hashes (sha1 for the manifest, sha256 for index.json: the identity the loader
    checks) and counts what the tar writer emits (no second read of the shard)."""

    def __init__(self, f):
        self.f, self.sha1, self.sha256, self.size = f, hashlib.sha1(), hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha1.update(b)
        self.sha256.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def write_shard(task: dict[str, Any], on_sample: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write one shard: ``task = {"path", "samples": [{"key", "id", "image", "sha1", "meta", "seg", "transcode",
    ...}], "quality", "fingerprint", "done", "split", "index"}``.

    The image file's bytes are checked against the sha1 ``prepare`` recorded. Written to ``.<name>.tmp``, fsynced,
    renamed; then the done-record (``task["done"]``, when given) is written atomically. Returns the shard's summary
    (name, split, index, num_samples, bytes, sha1, transcoded) and, without a done-record, its manifest records.
    ``on_sample(i)`` is a test hook called before sample ``i``.

    A sample is ``<key>.jpg`` (the image file's own bytes, or a plain upright JPEG made from them for the images
    ``prepare`` marked ``transcode``), ``<key>.json`` (canonical JSON) and ``<key>.seg.png`` when a semantic map
    exists; members are in sorted order with a fixed mtime, owner and mode. The done-record holds the fingerprint
    (what went in), size, sha1, mtime and one manifest record per sample.
    """
    path = Path(task["path"])
    tmp = path.parent / tmp_name(path.name)
    try:
        hf, records = _write_tar(tmp, task["samples"], path.name, on_sample, task.get("quality", 95))
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a Python-level failure cleans up; a SIGKILL leaves a .tmp that --verify rejects
        if is_enospc(exc):
            raise DiskFullError.of(path, _shard_bytes(task["samples"])) from None
        raise
    os.replace(tmp, path)
    summary = {"name": path.name, "split": task.get("split"), "index": task.get("index"), "num_samples": len(records),
               "bytes": hf.size, "sha1": hf.sha1.hexdigest(), "sha256": hf.sha256.hexdigest(),
               "transcoded": sum(r["transcoded"] for r in records)}
    if task.get("done"):  # compact JSON: the C encoder (an indented dump of 1000 records is ~10x slower)
        done = {**summary, "fingerprint": task["fingerprint"], "mtime_ns": path.stat().st_mtime_ns, "records": records}
        write_bytes_atomic(task["done"], json.dumps(done, separators=(",", ":")).encode())
        return summary
    return {**summary, "records": records}


def _shard_bytes(samples: list[dict[str, Any]]) -> int:
    """About the size of a shard of ``samples`` (their files' sizes in tar blocks): what a full disk was asked for."""
    total = 2 * BLOCK
    for s in samples:
        for f in (s.get("image"), s.get("seg")):
            if f:
                with contextlib.suppress(OSError):
                    total += member_span(os.stat(f).st_size)
        total += member_span(len(s.get("meta") or b""))
    return total


def _image_member(s: dict[str, Any], quality: int) -> bytes:
    try:
        data = Path(s["image"]).read_bytes()
    except OSError as exc:
        raise UserError(f"{s['image']}: cannot be read since `slotcon prepare` ({exc.strerror}); re-run prepare") from None
    if hashlib.sha1(data).hexdigest() != s["sha1"]:
        raise UserError(f"{s['image']}: content changed since `slotcon prepare` (sha1 differs); re-run prepare")
    if s.get("transcode"):
        return transcode(data, quality)
    return data


def _add_sample(tf, key: str, members: dict[str, bytes]) -> None:
    """What ``webdataset.TarWriter.write`` does (members in sorted order; fixed mtime, owner, mode), without importing
    webdataset (and torch) into every writer process; a test checks the bytes are the same as TarWriter's."""
    for ext in sorted(members):
        ti = tarfile.TarInfo(f"{key}.{ext}")
        ti.size, ti.mtime, ti.mode = len(members[ext]), FIXED_MTIME, TAR_MODE
        ti.uname = ti.gname = TAR_USER
        tf.addfile(ti, io.BytesIO(members[ext]))


def _write_tar(tmp: Path, samples: list[dict[str, Any]], name: str, on_sample, quality: int):
    records: list[dict[str, Any]] = []
    offset = 0
    with open(tmp, "wb") as raw:
        hf = _HashingFile(raw)
        with tarfile.open(fileobj=hf, mode="w|") as tf:  # a stream: nothing is seeked or read back
            for i, s in enumerate(samples):
                if on_sample is not None:
                    on_sample(i)
                jpg = _image_member(s, quality)
                members = {"jpg": jpg, "json": s["meta"]}
                seg = Path(s["seg"]).read_bytes() if s.get("seg") else None
                if seg is not None:
                    members["seg.png"] = seg
                _add_sample(tf, s["key"], members)
                records.append({
                    "key": s["key"], "id": s["id"], "shard": name, "index": i, "offset": offset,
                    "bytes": len(jpg), "sha1": hashlib.sha1(jpg).hexdigest() if s.get("transcode") else s["sha1"],
                    "source_sha1": s["sha1"], "transcoded": bool(s.get("transcode")),
                    "json_bytes": len(s["meta"]), "json_sha1": hashlib.sha1(s["meta"]).hexdigest(),
                    "seg_bytes": len(seg) if seg is not None else None,
                    "seg_sha1": hashlib.sha1(seg).hexdigest() if seg is not None else None,
                    "num_annotations": s["num_annotations"], "width": s["width"], "height": s["height"],
                })
                offset += sum(member_span(len(v)) for v in members.values())
        raw.flush()
        os.fsync(raw.fileno())
    return hf, records


def find_finished(done: Path, fingerprint: str, places: list[Path]) -> dict[str, Any] | None:
    """The summary of a shard an earlier run finished with this exact input, and where it lies now (``path``); None
    when there is none, the input differs, or the file is not the one recorded (size or mtime changed)."""
    try:
        rec = json.loads(done.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != fingerprint:
        return None
    for p in places:
        try:
            st = p.stat()
        except OSError:
            continue
        if st.st_size == rec["bytes"] and st.st_mtime_ns == rec["mtime_ns"]:
            out = {k: rec[k] for k in ("name", "split", "index", "num_samples", "bytes", "sha1", "transcoded")}
            if "sha256" not in rec:  # a done-record of an older writer: the shard is written again
                return None
            out["sha256"] = rec["sha256"]
            return {**out, "path": str(p)}
    return None


def read_records(done: Path) -> list[dict[str, Any]]:
    return json.loads(done.read_text())["records"]
