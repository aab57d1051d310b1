"""The loader's reading stages: shards -> raw samples (:class:`ReadShards`, one shard visit at a time, accounting for
every sample a visit should have delivered but did not) and raw samples -> decoded samples (:class:`DecodeSample` with
:class:`SkipHandler`, which records and skips a corrupt sample with its key and shard URL).
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Any, Mapping
from urllib.parse import urlparse

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from components.data.loading.decode import check_image_header, decode_rgb, decode_seg
from components.data.shards.index import shard_identity, shard_members
from components.errors import UserError

#: reasons of per-sample records (each cost one sample, named by ``key``)
SAMPLE_REASONS = ("incomplete_sample", "bad_json", "bad_image", "bad_seg")
#: reasons of per-visit records (a shard delivered fewer samples than it holds, or none)
SHARD_REASONS = ("unreadable_shard", "truncated_tar", "damaged_tar", "short_shard", "sha256_mismatch")
_ZERO_TAIL = 1024  # a complete tar ends with two 512-byte zero blocks


# --------------------------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------------------------
class ErrorLog:
    """Records of skipped and lost data inside one process (a loader worker or the main process).

    A record is ``{"reason", "url", "key", "lost", "detail"}``: ``lost`` is how many samples the problem cost (1 for a
    skipped sample, ``expected - read`` for a shard visit that ended early, None when a shard ended early and its
    expected count is unknown); ``key`` names a lost sample, while a shard-level record names instead the last
    sample read before the tar broke (``after``).
    """

    def __init__(self):
        self.pending: list[dict[str, Any]] = []

    def add(self, reason: str, url: str | None, key: str | None, detail: str, lost: int | None = 1,
            **extra: Any) -> None:
        self.pending.append({"reason": reason, "url": url, "key": key, "lost": lost, "detail": detail[:300], **extra})

    def drain(self) -> list[dict[str, Any]]:
        out, self.pending = self.pending, []
        return out


class SampleError(Exception):
    """A sample that cannot be used (corrupt member, missing member): skipped and recorded by :class:`SkipHandler`."""

    def __init__(self, reason: str, key: str | None, url: str | None, detail: str):
        super().__init__(f"{reason}: {key} in {url}: {detail}")
        self.reason, self.key, self.url, self.detail = reason, key, url, detail


class SkipHandler:
    """WebDataset exception handler of the decode stage: records a :class:`SampleError` and continues; anything else
    (a bug) is re-raised, never counted as corrupt data."""

    def __init__(self, errors: ErrorLog):
        self.errors = errors

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, SampleError):
            self.errors.add(exn.reason, exn.url, exn.key, exn.detail)
            return True
        raise exn


# --------------------------------------------------------------------------------------------------------------------
# opening a URL (no global patching of WebDataset's scheme table)
# --------------------------------------------------------------------------------------------------------------------
def open_url(url: str):
    """A readable binary stream of ``url``: local paths, ``file:``, ``pipe:`` and the schemes WebDataset's ``gopen``
    knows (http(s), gs, ...) through ``gopen``; every other fsspec protocol (s3, gcs, az, memory, ...) through
    ``fsspec.open``."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or len(scheme) == 1 or scheme in wds.gopen_schemes:  # len 1: a Windows drive letter
        return wds.gopen(url, "rb")
    import fsspec  # lazy: fsspec (~0.1 s) only for remote shard URLs

    return fsspec.open(url, "rb").open()


class TarStream:
    """Read-through wrapper of a shard stream that remembers how it ended, so the reader can tell a tar that ended
    properly from one cut short (no end-of-archive blocks) or one tarfile stopped reading early (data follows)."""

    def __init__(self, f):
        self.f, self.tail, self.read_bytes, self.eof = f, b"", 0, False

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        if b:
            self.tail = (self.tail + b)[-_ZERO_TAIL:]
            self.read_bytes += len(b)
        if n is None or n < 0 or len(b) < n:
            self.eof = True
        return b

    def verdict(self) -> tuple[str, str] | None:
        """After tarfile stopped: ``(reason, detail)`` if the shard did not end as a complete tar, else None.

        Reads what tarfile left unread: for a complete tar that is zero padding; anything else means tarfile stopped
        at a damaged header (its stream mode treats that as the end of the archive)."""
        stopped_at, rest = self.read_bytes, 0
        data_after = False
        while not self.eof:
            chunk = self.read(1 << 20)
            rest += len(chunk)
            data_after = data_after or bool(chunk.strip(b"\0"))
        if data_after:
            return ("damaged_tar", f"tarfile stopped before byte {stopped_at} and {rest} more bytes of data follow "
                                   "(a damaged member header ends Python's tarfile silently)")
        if len(self.tail) < _ZERO_TAIL or self.tail.strip(b"\0"):
            return ("truncated_tar", f"the shard ends after {self.read_bytes} bytes without tar's end-of-archive "
                                     "blocks (truncated)")
        return None

    def close(self) -> None:
        self.f.close()


def _short(exn: Exception) -> str:
    msg = str(exn.args[0]) if exn.args else str(exn)
    return f"{type(exn).__name__}: {msg.split(' @ ', 1)[0]}"  # tarfile's message without WebDataset's stream repr


def _reason(exn: Exception) -> str:
    """The record reason of an exception WebDataset's tar stages hand to the handler."""
    msg = str(exn.args[0]) if exn.args else ""
    if isinstance(exn, ValueError) and "duplicate file name" in msg:
        return "duplicate_member"
    if isinstance(exn, (tarfile.ReadError, EOFError)):
        # "unexpected end of data": the stream stopped inside a member; anything else (invalid header, bad checksum,
        # empty file) is a damaged archive
        return "truncated_tar" if "unexpected end" in msg else "damaged_tar"
    return "unreadable_shard"  # cannot open or read the stream (missing file, permissions, a failing pipe: command)


# --------------------------------------------------------------------------------------------------------------------
# shard visits
# --------------------------------------------------------------------------------------------------------------------
#: per process: url -> whether the shard's bytes matched the sha256 of its index.json (hashed at the first visit only)
_VERDICTS: dict[str, bool] = {}


# --------------------------------------------------------------------------------------------------------------------
class _Visit:
    """One reading of one shard: the first tar-level problem WebDataset's stages reported (through :meth:`handler`)
    and the member being read at the time."""

    def __init__(self, url: str):
        self.url, self.problem, self.member = url, None, None
        self.expected: int | None = None  # samples index.json lists (when the reader was given no count)
        self.mismatch = False  # the shard's sha256 is not the one index.json records

    def handler(self, exn: Exception) -> bool:
        if self.problem is None:  # a truncated member makes tarfile raise twice (its data, then the next header)
            self.problem = (_reason(exn), _short(exn) + (f" (reading {self.member})" if self.member else ""))
        return True

    def note_member(self, fname: str) -> str:
        """``rename_files`` hook: the member tarfile is about to read."""
        self.member = fname
        return fname


class ReadShards:
    """Stage: ``{"url"}`` dicts -> raw samples, shard visit by shard visit, recording what each visit lost.

    Built on WebDataset's tar stages (``tar_file_expander`` + ``group_by_keys`` with an exception handler); the
    per-visit accounting is ours because Python's ``tarfile`` ends an archive silently at a damaged member header (a
    bad checksum mid-archive reads as "end of archive") and at a truncation that falls on a header boundary, so
    WebDataset's handlers never hear of those losses. At the end of each visit it judges how the tar ended
    (:class:`TarStream`) and compares the samples read with the shard's expected count (``index.json``).
    ``expected``: ``{url: samples the shard holds}``; a visit that reads fewer records ``lost = expected - read``
    (exact), one without an expected count records ``lost=None`` when the tar visibly ended badly. A visit the
    consumer abandons (the epoch ended mid-shard) records nothing: its unread samples were not lost, only not reached.
    ``max_empty``: in resampled mode, raise after this many consecutive visits that gave no sample (every shard
    unreadable) instead of drawing shards forever.
    """

    def __init__(self, errors: ErrorLog, expected: Mapping[str, int] | None = None, max_empty: int | None = None):
        self.errors, self.expected, self.max_empty = errors, dict(expected or {}), max_empty

    def __call__(self, src):
        empty = 0
        for shard in src:
            n = 0
            for raw in self.visit(shard["url"]):
                n += 1
                yield raw
            empty = 0 if n else empty + 1
            if self.max_empty is not None and empty >= self.max_empty:
                raise UserError(f"{shard['url']}: {empty} shard visits in a row gave no sample; the shards are "
                                "unreadable (see the loader's skipped records; check with `slotcon shard --verify`)")

    def visit(self, url: str):
        visit = _Visit(url)
        try:
            stream, members = self._open_checked(url, visit)
        except Exception as exn:  # noqa: BLE001 - any failure to open is this shard's problem, recorded below
            visit.problem = ("unreadable_shard", _short(exn))
            self._finish(visit, 0, None, None)
            return
        n, last = 0, None
        seen: set[str] = set()
        try:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=visit.handler,
                                      rename_files=visit.note_member)
            for raw in group_by_keys(files, handler=visit.handler):
                if members is not None and not _as_written(raw, members, seen):
                    continue  # not a sample written into this shard (foreign, renamed, altered, repeated): lost
                n, last = n + 1, raw["__key__"]
                yield raw
            # how the tar ended, unless tarfile already said (a duplicated member does not end the archive)
            ended = stream.verdict() if visit.problem is None or visit.problem[0] == "duplicate_member" else None
        finally:
            try:
                stream.close()
            except Exception as exn:  # noqa: BLE001 - a pipe: command that failed reports it on close
                visit.problem = visit.problem or ("unreadable_shard", _short(exn))
        self._finish(visit, n, last, ended or None)

    def _open_checked(self, url: str, visit: _Visit) -> tuple[TarStream, dict[str, dict[str, str]] | None]:
        """The shard's stream, and None or (when its bytes are not the ones written) the samples it should hold.

        At the first visit in this process of a shard whose sha256 ``index.json`` records, its bytes are read and
        hashed before any sample is yielded (then parsed from memory); the verdict is kept for the process, so later
        visits do not hash. A shard that differs (swapped, rewritten, damaged, appended to) yields only the samples
        whose every member has the sha1 its manifest records; everything else counts as lost (``sha256_mismatch``)."""
        identity = shard_identity(url)
        if identity is None:
            return TarStream(open_url(url)), None
        visit.expected = identity[1]
        verdict = _VERDICTS.get(url)
        if verdict is None:
            f = open_url(url)
            try:
                data = f.read()
            finally:
                f.close()
            verdict = _VERDICTS[url] = hashlib.sha256(data).hexdigest() == identity[0]
            stream = TarStream(io.BytesIO(data))
        else:
            stream = TarStream(open_url(url))
        if verdict:
            return stream, None
        visit.mismatch = True
        return stream, shard_members(url)

    def _finish(self, visit: _Visit, n: int, last: str | None, ended: tuple[str, str] | None) -> None:
        expected = self.expected.get(visit.url, visit.expected)
        problem = visit.problem or ended
        if visit.mismatch and (problem is None or problem[0] == "duplicate_member"):
            problem = ("sha256_mismatch", "the shard's bytes are not those index.json records (replaced, rewritten "
                                          "or appended to); only its samples as written were used")
        if problem is not None and problem[0] == "duplicate_member":  # a member repeated: nothing went missing
            self.errors.add("duplicate_member", visit.url, None, problem[1], lost=0, after=last)
            problem = ended
        if expected is not None and n < expected:
            reason, detail = problem or ("short_shard", "the tar is complete but holds fewer samples than index.json "
                                                        "lists (shard replaced or index stale)")
            self.errors.add(reason, visit.url, None, f"read {n} of {expected} samples; {detail}",
                            lost=expected - n, after=last, read=n, expected=expected)
        elif problem is not None:  # damage that cost no whole sample (expected known) or an unknown number
            self.errors.add(problem[0], visit.url, None, f"read {n} samples, then: {problem[1]}",
                            lost=None if expected is None else 0, after=last, read=n)


def _as_written(raw: dict[str, Any], members: Mapping[str, Mapping[str, str]], seen: set[str]) -> bool:
    """Whether a raw sample is one the shard was written with: a listed key, seen first here, with exactly the
    listed members and each member's sha1."""
    key = raw.get("__key__")
    want = members.get(key)
    if want is None or key in seen:
        return False
    seen.add(key)
    have = {k: v for k, v in raw.items() if not k.startswith("__")}
    return set(have) == set(want) and all(hashlib.sha1(have[e]).hexdigest() == sha for e, sha in want.items())


# --------------------------------------------------------------------------------------------------------------------
# raw sample -> sample
# --------------------------------------------------------------------------------------------------------------------
class DecodeSample:
    """``wds.map`` function: raw sample -> ``{"key", "url", "image", "meta", "seg"}``; raises :class:`SampleError`.

    ``decode="rgb"``: the image as uint8 (3, H, W) RGB; ``"bytes"``: the JPEG bytes, after a header check (the
    device decodes them; what passes the header but not the decoder is dropped and counted there)."""

    def __init__(self, decode: str, with_seg: bool):
        self.decode, self.with_seg = decode, with_seg

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        key, url = raw.get("__key__"), raw.get("__url__")
        if "jpg" not in raw or "json" not in raw:
            have = sorted(k for k in raw if not k.startswith("__"))
            raise SampleError("incomplete_sample", key, url, f"members {have}, need jpg and json")
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as exc:
            raise SampleError("bad_json", key, url, str(exc)) from None
        try:
            image: Any = decode_rgb(raw["jpg"]) if self.decode == "rgb" else raw["jpg"]
            if self.decode != "rgb":
                check_image_header(image)
        except Exception as exc:  # PIL raises many types on garbage
            raise SampleError("bad_image", key, url, f"{type(exc).__name__}: {exc}") from None
        seg = None
        if self.with_seg and "seg.png" in raw:
            try:
                seg = decode_seg(raw["seg.png"])
            except Exception as exc:
                raise SampleError("bad_seg", key, url, f"{type(exc).__name__}: {exc}") from None
        return {"key": key, "url": url, "image": image, "meta": meta, "seg": seg}
