"""Writing one WebDataset shard (in a worker process): its members, fixed tar metadata, the atomic rename, and the
done-record that lets a killed run skip the shards it finished. Every byte is a function of the inputs, so a re-run
(or a resumed run) writes byte-identical shards.
"""
from __future__ import annotations

import contextlib
import hashlib
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
    """Write-through file wrapper that hashes and counts what the tar writer emits (no second read of the shard).
    One digest, sha256: the shard's identity in index.json (what the loader checks) and in the manifest (what
    ``--verify`` checks)."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha256.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def write_shard(task: dict[str, Any], on_sample: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write one shard: ``task = {"path", "samples": [{"key", "id", "image", "sha1", "meta", "seg", "transcode",
    ...}], "quality", "fingerprint", "done", "split", "index", "defer_sync"}``.

    The image file's bytes are checked against the sha1 ``prepare`` recorded. Written to ``.<name>.tmp``, fsynced,
    renamed; then the done-record (``task["done"]``, when given) is written atomically. Returns the shard's summary
    (name, split, index, num_samples, bytes, sha256, transcoded) and, without a done-record, its manifest records.
    With ``defer_sync`` the temporary file is only written and closed: the result then goes to :func:`finish_shard`
    (fsync, rename, done-record, in that order), which the caller runs beside the next shard's writing so the disk
    flush overlaps it. ``on_sample(i)`` is a test hook called before sample ``i``.

    A sample is ``<key>.jpg`` (the image file's own bytes, or a plain upright JPEG made from them for the images
    ``prepare`` marked ``transcode``), ``<key>.json`` (canonical JSON) and ``<key>.seg.png`` when a semantic map
    exists; members are in sorted order with a fixed mtime, owner and mode. The done-record holds the fingerprint
    (what went in), size, sha256, mtime and one manifest record per sample.
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
    summary = {"name": path.name, "split": task.get("split"), "index": task.get("index"), "num_samples": len(records),
               "bytes": hf.size, "sha256": hf.sha256.hexdigest(),
               "transcoded": sum(r["transcoded"] for r in records)}
    written = {"summary": summary, "tmp": str(tmp), "path": str(path), "done": task.get("done"), "records": None}
    if task.get("done"):  # compact JSON: the C encoder (an indented dump of 1000 records is ~10x slower); the mtime
        # is the temporary file's: a rename keeps it
        done = {**summary, "fingerprint": task["fingerprint"], "mtime_ns": tmp.stat().st_mtime_ns, "records": records}
        written["done_bytes"] = json.dumps(done, separators=(",", ":")).encode()
    else:
        written["records"] = records
    return written if task.get("defer_sync") else finish_shard(written)


def finish_shard(written: dict[str, Any]) -> dict[str, Any]:
    """Make a shard :func:`write_shard` wrote final: fsync its temporary file, rename it into place, then write its
    done-record atomically (a crash before the record leaves a ``.tmp`` that the next run rewrites). Returns the
    summary (plus the manifest records when there is no done-record)."""
    fd = os.open(written["tmp"], os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(written["tmp"], written["path"])
    if written["done"]:
        write_bytes_atomic(written["done"], written["done_bytes"])
        return written["summary"]
    return {**written["summary"], "records": written["records"]}


_NUL = bytes(BLOCK)
_RECORD = 20 * BLOCK  # tarfile's RECORDSIZE: the archive's length is padded to a multiple of it


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, FIXED_MTIME, TAR_MODE
    ti.uname = ti.gname = TAR_USER
    return ti


def _tarfile_header(name: str, size: int) -> bytes:
    """The header(s) ``tarfile`` writes for a member (PAX format: an extended header first when the name is long or
    not ASCII)."""
    return _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


_TEMPLATE = _tarfile_header("", 0)  # every field but name, size and checksum is the same for all members


def tar_header(name: str, size: int) -> bytes:
    """The member header ``tarfile`` would write, made from a template: a plain USTAR header with the name, size and
    checksum filled in; names that need a PAX record (over 100 bytes, not ASCII) and huge sizes go to tarfile."""
    raw = name.encode("ascii") if name.isascii() else None
    if raw is None or len(raw) > 100 or size >= 8**11:
        return _tarfile_header(name, size)
    hdr = bytearray(_TEMPLATE)
    hdr[: len(raw)] = raw
    hdr[124:136] = b"%011o\0" % size
    hdr[148:156] = b"        "
    hdr[148:155] = b"%06o\0" % sum(hdr)
    return bytes(hdr)


def _add_member(out, name: str, data: bytes) -> int:
    """One member as ``tarfile`` adds it (header, data, NUL padding to the block size): what
    ``webdataset.TarWriter.write`` emits (members in sorted order; fixed mtime, owner, mode), without importing
    webdataset (and torch) into every writer process; a test checks the bytes are the same as TarWriter's. Returns
    the bytes written."""
    hdr = tar_header(name, len(data))
    out.write(hdr)
    out.write(data)
    pad = -len(data) % BLOCK
    if pad:
        out.write(_NUL[:pad])
    return len(hdr) + len(data) + pad


def _end_archive(out, offset: int) -> None:
    """tarfile's end of archive: two NUL blocks, then NULs up to a whole record."""
    offset += 2 * BLOCK
    out.write(bytes(2 * BLOCK + (-offset % _RECORD)))


def _read_image(s: dict[str, Any]) -> bytes:
    try:
        with open(s["image"], "rb", buffering=0) as f:
            return f.readall()
    except OSError as exc:
        raise UserError(f"{s['image']}: cannot be read since `slotcon prepare` ({exc.strerror}); re-run prepare") from None


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
    data = _read_image(s)
    if hashlib.sha1(data).hexdigest() != s["sha1"]:
        raise UserError(f"{s['image']}: content changed since `slotcon prepare` (sha1 differs); re-run prepare")
    if s.get("transcode"):
        return transcode(data, quality)
    return data


def _record(s: dict[str, Any], name: str, i: int, offset: int, jpg: bytes, seg: bytes | None) -> dict[str, Any]:
    return {
        "key": s["key"], "id": s["id"], "shard": name, "index": i, "offset": offset,
        "bytes": len(jpg), "sha1": hashlib.sha1(jpg).hexdigest() if s.get("transcode") else s["sha1"],
        "source_sha1": s["sha1"], "transcoded": bool(s.get("transcode")),
        "json_bytes": len(s["meta"]), "json_sha1": hashlib.sha1(s["meta"]).hexdigest(),
        "seg_bytes": len(seg) if seg is not None else None,
        "seg_sha1": hashlib.sha1(seg).hexdigest() if seg is not None else None,
        "num_annotations": s["num_annotations"], "width": s["width"], "height": s["height"],
    }


WRITE_BUFFER = 1 << 20  # small members are gathered into 1 MiB writes; a member larger than that goes straight through


def _write_tar(tmp: Path, samples: list[dict[str, Any]], name: str, on_sample, quality: int):
    """Stream the members through one hashing writer (each byte hashed once, nothing seeked or read back)."""
    records: list[dict[str, Any]] = []
    offset = 0
    with open(tmp, "wb", buffering=WRITE_BUFFER) as raw:
        hf = _HashingFile(raw)
        for i, s in enumerate(samples):
            if on_sample is not None:
                on_sample(i)
            jpg = _image_member(s, quality)
            members = {"jpg": jpg, "json": s["meta"]}
            seg = None
            if s.get("seg"):
                with open(s["seg"], "rb") as f:
                    seg = members["seg.png"] = f.read()
            records.append(_record(s, name, i, offset, jpg, seg))
            for ext in sorted(members):
                offset += _add_member(hf, f"{s['key']}.{ext}", members[ext])
        _end_archive(hf, offset)
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
            if "sha256" not in rec:  # a done-record of an older writer: the shard is written again
                return None
            out = {k: rec[k] for k in ("name", "split", "index", "num_samples", "bytes", "sha256", "transcoded")}
            return {**out, "path": str(p)}
    return None


def read_records(done: Path) -> list[dict[str, Any]]:
    return json.loads(done.read_text())["records"]
