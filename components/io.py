"""Atomic file writes (a crash never leaves a half-written shard, checkpoint or metric file) and file checks.

Write to a temporary file in the same folder, flush, fsync, then ``os.replace`` (atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePath
from typing import Any, Iterator, BinaryIO

from components.errors import UserError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", size: int | None = None) -> Iterator[BinaryIO]:
    """Open a temp file next to ``path``; on clean exit fsync and rename it over ``path``, on error delete it.

    A full disk (ENOSPC, also when creating the temp file) is a one-line :class:`DiskFullError` naming the folder
    and the bytes needed (``size`` when the caller knows it, else at least what was written before the disk filled)."""
    path = Path(path)
    written = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError.of(path, size or 0) from None
        raise
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a result file gets the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
            finally:
                with contextlib.suppress(OSError, ValueError):
                    written = f.tell()
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_enospc(exc):
            raise DiskFullError.of(path, max(size or 0, written)) from None
        raise


def is_enospc(exc: BaseException) -> bool:
    """An ENOSPC OSError, or one that wraps it (``torch.save`` reports a failed write as a RuntimeError)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if isinstance(exc, RuntimeError) and "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class DiskFullError(UserError):
    """No space left while writing a file: one line naming the folder and the bytes needed (see :meth:`of`)."""

    @classmethod
    def of(cls, path: str | os.PathLike, needed: int) -> "DiskFullError":
        """The error for ``path``: ``needed`` bytes (0: unknown) and what the folder's file system has free."""
        path = Path(path)
        try:
            free = f", {shutil.disk_usage(path.parent).free} bytes free"
        except OSError:
            free = ""
        need = f"needs {needed} bytes or more" if needed else "needs more space"
        return cls(f"{path.parent}: no space left on the device writing {path.name} ({need}{free}); free space "
                   "there (or point the output elsewhere) and re-run: no half-written file was left")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb", size=len(data)) as f:
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
    """``torch.save`` of :func:`to_plain` ``(obj)`` through :func:`atomic_open` (checkpoints, exported backbones):
    every file this project writes loads with ``torch.load(weights_only=True)``."""
    import torch  # lazy: torch costs ~1 s at start-up; the data stages write files here without it

    with atomic_open(path, "wb") as f:
        torch.save(to_plain(obj), f)


def to_plain(obj: Any) -> Any:
    """``obj`` with only what torch's restricted unpickler reads: tensors, numbers, strings, bytes, None and
    dicts / lists / tuples of them. Paths become strings, enums their values, numpy scalars numbers and numpy arrays
    tensors; any other object is a TypeError (it would need the full unpickler, which can run code)."""
    import numpy as np  # lazy: only the torch writers need it
    import torch  # lazy: see save_torch_atomic

    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device)):
        return obj.value if isinstance(obj, enum.Enum) else obj
    if isinstance(obj, enum.Enum):
        return to_plain(obj.value)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj) if type(obj) in (list, tuple) else [to_plain(v) for v in obj]
    raise TypeError(f"cannot store a {type(obj).__name__} in a torch file read with weights_only=True; convert it to "
                    "tensors, numbers, strings, lists or dicts")


class PickledObjectsError(UserError):
    """A torch file that needs the full unpickler (Python objects, not only tensors and plain values)."""


def load_torch_plain(path: str | os.PathLike, map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``: never runs code from the file. A file that holds pickled Python
    objects (an older format, or a crafted file) raises :class:`PickledObjectsError` (message: one line, without the
    file name, for the caller to prefix); other failures propagate."""
    import torch  # lazy: see save_torch_atomic

    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower() and "unsupported class" not in str(exc).lower():
            raise  # no object in it, only bytes the unpickler cannot read (garbage, truncated): the caller's case
        first = str(exc).strip().splitlines()
        what = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), "")
        raise PickledObjectsError(
            "refusing to load: it holds pickled Python objects, not only tensors and plain values (a file of an older "
            f"format, or a crafted one that would run code{': ' + what[:120] if what else ''})") from None


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


def read_torch_file(path: str | os.PathLike, kind: str, fix: str, map_location: Any = "cpu") -> Any:
    """:func:`load_torch_plain` of a file this project wrote, every failure one line naming ``path``: damaged bytes,
    pickled objects, not a torch file (``kind``: e.g. "backbone file"; ``fix``: what to run)."""
    damage = torch_file_damage(path)
    if damage:
        raise UserError(f"{path}: not a readable {kind} ({damage}); {fix}")
    try:
        return load_torch_plain(path, map_location)
    except PickledObjectsError as exc:
        raise UserError(f"{path}: {exc}; {fix}") from None
    except Exception as exc:  # truncated, not a torch file
        raise UserError(f"{path}: not a readable {kind} ({type(exc).__name__}); {fix}") from None
