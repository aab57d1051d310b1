"""Atomic file writes (a crash never leaves a half-written shard, checkpoint or metric file) and file checks.

Write to a temporary file in the same folder, flush, fsync, then ``os.replace`` (atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, BinaryIO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temp file next to ``path``; on clean exit fsync and rename it over ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a result file gets the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def json_default(o: Any) -> Any:
    """``json.dumps`` default: numpy / torch scalars as numbers, paths as strings."""
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_open` (checkpoints, exported backbones)."""
    import torch  # lazy: torch costs ~1 s at start-up; the data stages write files here without it

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def torch_file_damage(path: str | os.PathLike) -> str | None:
    """None if ``path`` (a ``torch.save`` zip archive) reads back intact, else what is wrong with it.

    ``torch.load`` does not check the CRC-32 that ``torch.save`` stores for every member, so flipped bytes inside a
    tensor's payload load silently as wrong weights; this reads every member once and compares. Files in torch's
    legacy (non-zip) format are not checked (None)."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        return f"damaged archive ({type(exc).__name__}: {exc})"
    return f"damaged bytes in member {bad!r} (CRC-32 mismatch)" if bad else None


def sha1_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha1 of a file's bytes, read in chunks (manifests, checkpoint fingerprints of input files)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
