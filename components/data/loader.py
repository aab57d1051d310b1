"""The one way training and evaluation read shards: :func:`make_loader` (batches) and :func:`iterate_samples` (eval).

Built on WebDataset 1.0.2 (``wds.WebDataset`` + ``wds.WebLoader``). URLs are local paths, brace patterns
(``data/shards/train2017/train2017-{000000..000003}.tar``), ``pipe:`` commands, or any fsspec URL (``s3://``,
``gcs://``, ``memory://`` ...; opened with ``fsspec.open``), so several nodes can read the same shards.

A sample is ``{"key": str, "url": str, "image": bytes | uint8 tensor (3, H, W) RGB, "meta": dict, "seg": uint8
tensor (H, W) | None}`` where ``meta`` is the shard's ``json`` member (``{"image": COCO image record,
"annotations": [...]}``) and ``seg`` the semantic map (255 = ignore) when ``with_seg`` and the sample has one.

Distributed reading (rank / world size from the arguments, else :mod:`components.dist`):

- ``resampled=True`` (training): every rank and worker draws shards with replacement from the whole list with its
  own seeded RNG, and each rank yields exactly ``samples_per_epoch // world_size // batch_size`` batches, so DDP never
  waits at an epoch's end for a rank that ran out.
- ``resampled=False`` (one pass): the shard list is permuted by ``(seed, epoch)`` (the same on every rank), then split
  disjointly over ranks and then loader workers; together the ranks read every sample once. It needs at least
  ``world_size * max(1, num_workers)`` shards (a clear UserError otherwise); ranks may get different batch counts.

Shuffling: shard order (above) plus a sample buffer, seeded from ``(seed, epoch, rank, worker)``, as are Python's,
NumPy's and torch's RNGs in each loader worker process (so ``map_fn``'s random crops are repeatable; with
``num_workers=0`` the caller's global RNGs are left alone). Samples were also shuffled once when the shards were
written. Non-resampled mode under DDP can give ranks different batch counts: train with ``resampled=True``.

Corrupt data (undecodable JPEG, bad JSON, a sample missing a member, a truncated or unreadable tar) is skipped,
logged with its key and shard URL, and counted. Workers send their error records to the main process alongside the
batches, so ``loader.stats`` (per epoch) and ``loader.errors`` hold the totals over all workers; a one-line summary is
logged at the end of each epoch.
"""
from __future__ import annotations

import importlib
import io
import json
import logging
import random
import warnings
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg  # imported here, once: forked workers inherit it

_wds_gopen = importlib.import_module("webdataset.gopen")  # the module (``webdataset.gopen`` is also a function)

from components.errors import UserError

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec, but decode_jpeg is still the fast CPU path
# and the nvJPEG path we want on GPUs; silence only that notice.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle=", category=UserWarning)

DEFAULT_SHUFFLE_BUFFER = 1000  # samples held per worker; shards are pre-shuffled at write time, so this suffices
MAX_ERRORS_LOGGED = 20  # per epoch, one line each; the rest only counted


# --------------------------------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------------------------------
def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    import fsspec

    return fsspec.open(url, mode).open()


def _register_fsspec_schemes() -> None:
    """Route every fsspec protocol WebDataset doesn't handle itself (s3, gcs, az, memory, ...) through fsspec."""
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec is a dependency
        return
    for proto in fsspec.available_protocols():
        if proto not in _wds_gopen.gopen_schemes and proto not in ("file", "local"):
            _wds_gopen.gopen_schemes[proto] = _gopen_fsspec


_register_fsspec_schemes()


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """A brace pattern / ``::``-separated string, or a list of them, -> a flat list of shard URLs."""
    if isinstance(urls, str):
        urls = [urls]
    out: list[str] = []
    for u in urls:
        out.extend(wds.shardlists.expand_urls(str(u)))
    if not out:
        raise UserError("make_loader: no shard URLs given; pass split_urls(shards_root, split) or a brace pattern")
    return out


def _check_local(urls: list[str]) -> None:
    """Local shard paths must exist before any worker starts (a typo would otherwise only log skips, or spin forever
    when resampling); remote URLs are checked when opened."""
    import os
    from urllib.parse import urlparse

    for u in urls:
        scheme = urlparse(u).scheme
        path = urlparse(u).path if scheme == "file" else u if scheme == "" or len(scheme) == 1 else None
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{path}: shard not found ({len(urls)} URLs given); run `slotcon shard` or fix the path")


def _seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints (seed, epoch, rank, worker): different tuples -> independent streams."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --------------------------------------------------------------------------------------------------------------------
# per-worker pieces (module-level classes: picklable for any multiprocessing start method)
# --------------------------------------------------------------------------------------------------------------------
class _ErrorLog:
    """Collects skipped-data records inside one process (a loader worker or the main process)."""

    def __init__(self):
        self.pending: list[dict[str, Any]] = []
        self.current_url: str | None = None
        self.current_member: str | None = None
        self.visit = 0  # shard visits so far (a resampled worker may read the same URL many times)
        self._last_tar_error: tuple | None = None

    def start_shard(self, url: str) -> None:
        self.current_url, self.current_member = url, None
        self.visit += 1

    def add(self, reason: str, key: str | None, url: str | None, detail: str) -> None:
        self.pending.append({"reason": reason, "key": key, "url": url, "detail": detail[:300]})

    def handler(self, exn: Exception) -> bool:
        """WebDataset's exception handler (opening a URL, reading a tar, grouping members): record and continue."""
        url = self.current_url
        key = self.current_member.split(".", 1)[0] if self.current_member else None
        reason = "unreadable_shard" if isinstance(exn, (FileNotFoundError, PermissionError)) else "truncated_tar"
        if isinstance(exn, ValueError) and "duplicate file name" in str(exn):
            reason = "duplicate_member"
        # a truncated tar makes WebDataset call the handler twice (the member's data, then the next header): one
        # problem per reason per shard visit is counted
        ident = (self.visit, reason)
        if ident == self._last_tar_error:
            return True
        self._last_tar_error = ident
        self.add(reason, key, url, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True

    def note_member(self, fname: str) -> str:
        """``rename_files`` hook: called with each member name before its data is read (tracks the current key)."""
        self.current_member = fname
        return fname

    def drain(self) -> list[dict[str, Any]]:
        out, self.pending = self.pending, []
        return out


class _NodeSplitter:
    """Stage after the URL list: which shards this rank reads (or, resampled, all of them)."""

    def __init__(self, rank: int, world_size: int, resampled: bool, shuffle: bool, seed: int, epoch: int):
        self.rank, self.world_size = rank, world_size
        self.resampled, self.shuffle, self.seed, self.epoch = resampled, shuffle, seed, epoch

    def __call__(self, src):
        urls = [s["url"] for s in src]
        if self.resampled:
            yield from ({"url": u} for u in urls)
            return
        if self.shuffle:  # the same permutation on every rank (no rank in the seed): splits stay disjoint
            random.Random(_seed(self.seed, self.epoch, 0x5A4D)).shuffle(urls)
        yield from ({"url": u} for u in urls[self.rank :: self.world_size])


class _WorkerSplitter:
    """Which shards this loader worker reads: a disjoint slice, or an endless seeded draw with replacement."""

    def __init__(self, resampled: bool, seed: int, epoch: int, rank: int, errors: _ErrorLog):
        self.resampled, self.seed, self.epoch, self.rank, self.errors = resampled, seed, epoch, rank, errors

    def __call__(self, src):
        urls = [s["url"] for s in src]
        wid, nw = _worker()
        if self.resampled:
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, wid, 0x5EED))
            while True:
                u = urls[rng.randrange(len(urls))]
                self.errors.start_shard(u)
                yield {"url": u}
        for u in urls[wid::nw]:
            self.errors.start_shard(u)
            yield {"url": u}


def decode_rgb(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, H, W) RGB. libjpeg-turbo via torchvision (grey and CMYK become RGB); PIL for the rest."""
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_seg(data: bytes) -> torch.Tensor:
    """Single-channel PNG -> uint8 (H, W) class ids (255 = ignore)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"semantic map has mode {im.mode}, expected L or P")
        arr = np.asarray(im)
    return torch.from_numpy(arr.copy())


def _to_sample(raw: dict[str, Any], decode: str, with_seg: bool, errors: _ErrorLog) -> dict[str, Any] | None:
    key, url = raw.get("__key__"), raw.get("__url__")
    if "jpg" not in raw or "json" not in raw:
        have = sorted(k for k in raw if not k.startswith("__"))
        errors.add("incomplete_sample", key, url, f"members {have}, need jpg and json")
        return None
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as exc:
        errors.add("bad_json", key, url, str(exc))
        return None
    if decode == "rgb":
        try:
            image: Any = decode_rgb(raw["jpg"])
        except Exception as exc:  # PIL raises many types on garbage
            errors.add("bad_image", key, url, f"{type(exc).__name__}: {exc}")
            return None
    else:
        image = raw["jpg"]
    seg = None
    if with_seg and "seg.png" in raw:
        try:
            seg = decode_seg(raw["seg.png"])
        except Exception as exc:
            errors.add("bad_seg", key, url, f"{type(exc).__name__}: {exc}")
            return None
    return {"key": key, "url": url, "image": image, "meta": meta, "seg": seg}


class _Samples:
    """Stage: raw tar samples -> (shuffle buffer) -> decoded sample dicts -> ``map_fn``. Seeds RNGs per worker."""

    def __init__(self, *, decode, with_seg, map_fn, shuffle, shuffle_buffer, seed, epoch, rank, errors):
        self.decode, self.with_seg, self.map_fn = decode, with_seg, map_fn
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.seed, self.epoch, self.rank, self.errors = seed, epoch, rank, errors

    def __call__(self, src):
        wid, _ = _worker()
        s = _seed(self.seed, self.epoch, self.rank, wid)
        if torch.utils.data.get_worker_info() is not None:
            # in a loader worker, map_fn's global-RNG draws (crop parameters) become a function of (seed, epoch,
            # rank, worker): repeatable runs. Never in the main process (num_workers=0): the caller's RNGs are its own.
            random.seed(s)
            np.random.seed(s % 2**32)
            torch.manual_seed(s)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(s ^ 0xB0FFE7)
            src = wds.filters._shuffle(src, bufsize=self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)
        for raw in src:
            sample = _to_sample(raw, self.decode, self.with_seg, self.errors)
            if sample is None:
                continue
            if self.map_fn is not None:
                sample = self.map_fn(sample)  # a bug in map_fn is the consumer's: raise, don't count it as corrupt
                if sample is None:
                    continue
            yield sample


class _Emit:
    """Last worker stage: batches plus the worker's error records, as ``("err", records)`` / ``("batch", b, n)``."""

    def __init__(self, batch_size: int, collate_fn, drop_last: bool, errors: _ErrorLog):
        self.batch_size, self.collate_fn, self.drop_last, self.errors = batch_size, collate_fn, drop_last, errors

    def _pack(self, batch):
        return ("batch", self.collate_fn(batch) if self.collate_fn is not None else batch, len(batch))

    def __call__(self, src):
        batch: list[dict[str, Any]] = []
        for sample in src:
            batch.append(sample)
            if len(batch) == self.batch_size:
                if self.errors.pending:
                    yield ("err", self.errors.drain(), 0)
                yield self._pack(batch)
                batch = []
        if self.errors.pending:
            yield ("err", self.errors.drain(), 0)
        if batch and not self.drop_last:
            yield self._pack(batch)


# --------------------------------------------------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------------------------------------------------
class TruncatedTarError(OSError):
    """A shard stream ended without tar's end-of-archive blocks."""


class _TarGuard:
    """Read-through wrapper of a shard stream that notices truncation.

    Python's ``tarfile`` in stream mode ends iteration *silently* when the data stops at a header boundary, so a tar
    cut there would just look shorter. Every complete archive ends with two 512-byte zero blocks (plus zero padding):
    if the stream reaches EOF and its last 1024 bytes are not all zero, the shard was truncated.
    """

    def __init__(self, f, url: str):
        self.f, self.url, self.tail = f, url, b""
        self.at_eof = self.truncated = self.raised = False

    def read(self, n: int = -1) -> bytes:
        if self.at_eof:
            # raise on the read *after* EOF: tarfile has consumed every complete member of the last chunk by then
            if self.truncated and not self.raised:
                self.raised = True
                raise TruncatedTarError(f"{self.url}: ends without the end-of-archive blocks (truncated shard)")
            return b""
        b = self.f.read(n)
        if b:
            self.tail = (self.tail + b)[-1024:]
        if n is None or n < 0 or len(b) < n:
            self.at_eof = True
            self.truncated = len(self.tail) < 1024 or bool(self.tail.strip(b"\0"))
        return b

    def close(self) -> None:
        self.f.close()


def _guard_streams(src):
    for s in src:
        s["stream"] = _TarGuard(s["stream"], s.get("url", "?"))
        yield s


def _build_dataset(urls, *, rank, world_size, resampled, shuffle, seed, epoch, errors) -> wds.WebDataset:
    ds = wds.WebDataset(
        urls,
        resampled=False,  # resampling is done by _WorkerSplitter with an explicit (seed, epoch, rank, worker) RNG
        shardshuffle=False,  # shard order is set by _NodeSplitter, identically on every rank
        nodesplitter=_NodeSplitter(rank, world_size, resampled, shuffle, seed, epoch),
        workersplitter=_WorkerSplitter(resampled, seed, epoch, rank, errors),
        handler=errors.handler,
        rename_files=errors.note_member,
        empty_check=False,
        seed=seed,
    )
    # after the URL opener (a dict(url, stream) per shard), before the tar reader: detect truncated shards
    opener = next(i for i, st in enumerate(ds.pipeline) if isinstance(st, wds.cache.StreamingOpen))
    ds.pipeline.insert(opener + 1, _guard_streams)
    return ds


def _pass_through(item):
    return item


class ShardLoader:
    """Iterable of batches over WebDataset shards; one ``for`` loop = one epoch (see the module docstring).

    Attributes after (or during) an epoch: ``stats = {"epoch", "batches", "samples", "skipped",
    "skipped_by_reason"}`` and ``errors`` (one record per skipped item: reason, key, url, detail), summed over
    workers. ``set_epoch(e)`` changes the shuffling/resampling seeds for the next loop (as DistributedSampler).
    ``len(loader)`` is the exact batch count per rank in resampled mode.
    """

    def __init__(
        self,
        urls,
        *,
        batch_size: int,
        decode: str = "rgb",
        with_seg: bool = False,
        map_fn: Callable | None = None,
        collate_fn: Callable | None = None,
        shuffle: bool = True,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
        from components import dist

        if decode not in ("rgb", "bytes"):
            raise ValueError(f"decode={decode!r}: must be 'rgb' (uint8 tensors) or 'bytes' (JPEG bytes)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.urls = expand_urls(urls)
        _check_local(self.urls)
        self.rank = dist.get_rank() if rank is None else int(rank)
        self.world_size = dist.get_world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must be in [0, world_size={self.world_size})")
        self.batch_size, self.decode, self.with_seg = batch_size, decode, with_seg
        self.map_fn, self.collate_fn, self.shuffle, self.drop_last = map_fn, collate_fn, shuffle, drop_last
        self.resampled, self.samples_per_epoch = resampled, samples_per_epoch
        self.num_workers, self.seed, self.epoch = num_workers, seed, epoch
        self.shuffle_buffer, self.pin_memory, self.prefetch_factor = shuffle_buffer, pin_memory, prefetch_factor
        self.num_batches: int | None = None
        if resampled:
            if not samples_per_epoch:
                raise UserError("make_loader: resampled=True needs samples_per_epoch (the epoch length over all ranks)")
            self.num_batches = samples_per_epoch // self.world_size // batch_size
            if self.num_batches < 1:
                raise UserError(
                    f"make_loader: samples_per_epoch={samples_per_epoch} gives no batch of {batch_size} on each of "
                    f"{self.world_size} ranks; raise samples_per_epoch or lower the batch size"
                )
        else:
            need = self.world_size * max(1, num_workers)
            if len(self.urls) < need:
                raise UserError(
                    f"make_loader: {len(self.urls)} shard(s) for {self.world_size} rank(s) x {max(1, num_workers)} "
                    f"worker(s): each needs at least one shard in non-resampled mode; write smaller shards "
                    f"(shard.max_count), use fewer workers, or resampled=True"
                )
            if samples_per_epoch:  # optional cap on a one-pass epoch
                self.num_batches = samples_per_epoch // self.world_size // batch_size or None
        self.stats: dict[str, Any] = self._empty_stats()
        self.errors: list[dict[str, Any]] = []

    def _empty_stats(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": 0, "samples": 0, "skipped": 0, "skipped_by_reason": {}}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.resampled and self.num_batches is not None:
            return self.num_batches
        raise TypeError("len() of a non-resampled ShardLoader is not known before the pass (pass resampled=True)")

    def _pipeline(self):
        errors = _ErrorLog()
        ds = _build_dataset(
            self.urls, rank=self.rank, world_size=self.world_size, resampled=self.resampled, shuffle=self.shuffle,
            seed=self.seed, epoch=self.epoch, errors=errors,
        )
        ds = ds.compose(
            _Samples(decode=self.decode, with_seg=self.with_seg, map_fn=self.map_fn, shuffle=self.shuffle,
                     shuffle_buffer=self.shuffle_buffer, seed=self.seed, epoch=self.epoch, rank=self.rank,
                     errors=errors),
            _Emit(self.batch_size, self.collate_fn, self.drop_last, errors),
        )
        return ds

    def __iter__(self) -> Iterator[Any]:
        ds = self._pipeline()
        if self.num_workers > 0:
            kw: dict[str, Any] = dict(
                # batch_size=None: workers already batch; _pass_through: skip DataLoader's default_convert, which
                # would walk every annotation list of every sample in Python
                batch_size=None, collate_fn=_pass_through, num_workers=self.num_workers, pin_memory=self.pin_memory,
                generator=torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.rank)),
            )
            if self.prefetch_factor is not None:
                kw["prefetch_factor"] = self.prefetch_factor
            source = wds.WebLoader(ds, **kw)
        else:
            source = ds
        self.stats, self.errors = self._empty_stats(), []
        reasons: Counter = Counter()
        it = iter(source)
        try:
            for kind, payload, n in it:
                if kind == "err":
                    for rec in payload:
                        if len(self.errors) < MAX_ERRORS_LOGGED:
                            log.warning("loader: skipped %s key=%s url=%s: %s", rec["reason"], rec["key"], rec["url"], rec["detail"])
                        self.errors.append(rec)
                        reasons[rec["reason"]] += 1
                    self.stats["skipped"] = len(self.errors)
                    self.stats["skipped_by_reason"] = dict(sorted(reasons.items()))
                    continue
                self.stats["batches"] += 1
                self.stats["samples"] += n
                yield payload
                if self.num_batches is not None and self.stats["batches"] >= self.num_batches:
                    break
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # shuts the DataLoader workers down now (resampled workers never finish on their own)
            del it
            level = logging.WARNING if self.stats["skipped"] else logging.INFO
            log.log(level, "loader: epoch %d rank %d: %d batches, %d samples, %d skipped %s", self.epoch, self.rank,
                    self.stats["batches"], self.stats["samples"], self.stats["skipped"], self.stats["skipped_by_reason"])


def make_loader(
    urls,
    *,
    batch_size: int,
    decode: str = "rgb",
    with_seg: bool = False,
    map_fn: Callable | None = None,
    collate_fn: Callable | None = None,
    shuffle: bool = True,
    resampled: bool = False,
    samples_per_epoch: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool = False,
    **kw,
) -> ShardLoader:
    """Batches ``collate_fn(list_of_samples)`` (default: the list itself) from WebDataset shards.

    ``decode="rgb"``: ``sample["image"]`` is a uint8 (3, H, W) RGB tensor; ``"bytes"``: the original JPEG bytes (decode
    later, e.g. batched nvJPEG on the GPU). ``map_fn(sample)`` and ``collate_fn`` run in the loader workers.
    Resampled mode yields exactly ``samples_per_epoch // world_size // batch_size`` batches per rank. Extra keywords:
    ``shuffle_buffer``, ``pin_memory``, ``prefetch_factor``. See the module docstring for splitting and seeding.
    """
    return ShardLoader(
        urls, batch_size=batch_size, decode=decode, with_seg=with_seg, map_fn=map_fn, collate_fn=collate_fn,
        shuffle=shuffle, resampled=resampled, samples_per_epoch=samples_per_epoch, num_workers=num_workers,
        seed=seed, epoch=epoch, rank=rank, world_size=world_size, drop_last=drop_last, **kw,
    )


class SampleIterator:
    """Samples of the given shards in a fixed order (shard order as given, tar order within), in this process.

    ``stats`` / ``errors`` count skipped corrupt data, as for :class:`ShardLoader`.
    """

    def __init__(self, urls, *, decode: str = "rgb", with_seg: bool = False):
        if decode not in ("rgb", "bytes"):
            raise ValueError(f"decode={decode!r}: must be 'rgb' or 'bytes'")
        self._errors = _ErrorLog()
        urls = expand_urls(urls)
        _check_local(urls)
        ds = _build_dataset(urls, rank=0, world_size=1, resampled=False, shuffle=False, seed=0, epoch=0,
                            errors=self._errors)
        self._it = iter(ds)
        self.decode, self.with_seg = decode, with_seg
        self.stats: dict[str, Any] = {"samples": 0, "skipped": 0, "skipped_by_reason": {}}
        self.errors: list[dict[str, Any]] = []

    def _collect(self) -> None:
        for rec in self._errors.drain():
            if len(self.errors) < MAX_ERRORS_LOGGED:
                log.warning("loader: skipped %s key=%s url=%s: %s", rec["reason"], rec["key"], rec["url"], rec["detail"])
            self.errors.append(rec)
        self.stats["skipped"] = len(self.errors)
        self.stats["skipped_by_reason"] = dict(sorted(Counter(e["reason"] for e in self.errors).items()))

    def __iter__(self) -> "SampleIterator":
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            try:
                raw = next(self._it)
            except StopIteration:
                self._collect()
                if self.stats["skipped"]:
                    log.warning("loader: %d samples, %d skipped %s", self.stats["samples"], self.stats["skipped"],
                                self.stats["skipped_by_reason"])
                raise
            sample = _to_sample(raw, self.decode, self.with_seg, self._errors)
            self._collect()
            if sample is not None:
                self.stats["samples"] += 1
                return sample


def iterate_samples(urls, *, decode: str = "rgb", with_seg: bool = False) -> SampleIterator:
    """Yield samples in a fixed order (evaluation); corrupt ones are skipped and counted in ``.stats``."""
    return SampleIterator(urls, decode=decode, with_seg=with_seg)
