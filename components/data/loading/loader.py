"""The one way training and evaluation read shards: :func:`make_loader` (batches, distributed, shuffled, resampled or
one pass) and :func:`iterate_samples` (evaluation, fixed order), built on WebDataset's own stages. Every corrupt or
lost sample is skipped and counted (:mod:`components.data.loading.reading`).
"""
from __future__ import annotations

import logging
import os
import random
import warnings
from collections import Counter
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds

from components import dist
from components.data.loading.decode import decode_rgb, decode_seg  # noqa: F401  (re-exported: the loader's decoders)
from components.data.loading.reading import DecodeSample, ErrorLog, ReadShards, SkipHandler
from components.errors import UserError

__all__ = ["make_loader", "ShardLoader", "iterate_samples", "SampleIterator", "decode_rgb", "decode_seg",
           "expand_urls"]

log = logging.getLogger(__name__)

warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle=", category=UserWarning)

DEFAULT_SHUFFLE_BUFFER = 1000  # samples held per worker; shards are pre-shuffled at write time, so this suffices
MAX_ERRORS_LOGGED = 20  # per epoch, one line each; the rest only counted


# --------------------------------------------------------------------------------------------------------------------
# URLs and seeds
# --------------------------------------------------------------------------------------------------------------------
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
    """Local shard paths must exist before any worker starts (a typo would otherwise only log skips, or spin until the
    empty-visit guard when resampling); remote URLs are checked when opened."""
    for u in urls:
        scheme = urlparse(u).scheme
        path = urlparse(u).path if scheme == "file" else u if scheme == "" or len(scheme) == 1 else None
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{path}: shard not found ({len(urls)} URLs given); run `slotcon shard` or fix the path")


def _check_expected(urls: list[str], expected: Mapping[str, int] | None) -> dict[str, int] | None:
    if expected is None:
        return None
    missing = [u for u in urls if u not in expected]
    if missing:
        raise UserError(f"make_loader: expected_counts has no entry for {len(missing)} of {len(urls)} shard URLs "
                        f"(first: {missing[0]}); pass the counts of the same paths (shards.expected_counts)")
    return {u: int(expected[u]) for u in urls}


def _seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints (seed, epoch, rank, worker): different tuples -> independent streams."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


# --------------------------------------------------------------------------------------------------------------------
# per-worker stages (module-level classes: picklable for any multiprocessing start method)
# --------------------------------------------------------------------------------------------------------------------
class _SeedWorker:
    """DataLoader ``worker_init_fn``: Python's, NumPy's and torch's RNGs of worker w from ``(seed, epoch, rank, w)``,
    so ``map_fn``'s global-RNG draws are repeatable (never run in the main process: the caller's RNGs are its own)."""

    def __init__(self, seed: int, epoch: int, rank: int):
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, worker_id: int) -> None:
        s = _seed(self.seed, self.epoch, self.rank, worker_id)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)


class _Shuffle:
    """``wds.shuffle`` with an RNG made in the worker from ``(seed, epoch, rank, worker)`` (a curried RNG object would
    be pickled into every worker as the same stream)."""

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int):
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def __call__(self, src):
        rng = random.Random(_seed(self.seed, self.epoch, self.rank, _worker_id()) ^ 0xB0FFE7)
        return wds.shuffle(self.bufsize, initial=min(100, self.bufsize), rng=rng)(src)


class _Collate:
    """``wds.batched`` collation: ``(collate_fn(samples) or the list, number of samples)``."""

    def __init__(self, collate_fn: Callable | None):
        self.collate_fn = collate_fn

    def __call__(self, samples: list) -> tuple[Any, int]:
        return (self.collate_fn(samples) if self.collate_fn is not None else samples), len(samples)


class _AttachErrors:
    """Last worker stage: each batch travels with the records its worker made since the previous one, as
    ``{"batch", "n", "errors"}``; records made after the last batch follow as ``{"batch": None, ...}``."""

    def __init__(self, errors: ErrorLog):
        self.errors = errors

    def __call__(self, src):
        for batch, n in src:
            yield {"batch": batch, "n": n, "errors": self.errors.drain()}
        tail = self.errors.drain()
        if tail:
            yield {"batch": None, "n": 0, "errors": tail}


def _decode(errors: ErrorLog, decode: str, with_seg: bool):
    return wds.map(DecodeSample(decode, with_seg), handler=SkipHandler(errors))


def _pass_through(item):
    return item


# --------------------------------------------------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------------------------------------------------
class _Tally:
    """Folds records into ``stats`` / ``errors`` in the main process (logs the first MAX_ERRORS_LOGGED)."""

    def __init__(self, stats: dict[str, Any], errors: list[dict[str, Any]]):
        self.stats, self.errors = stats, errors
        self.reasons: Counter = Counter(stats.get("skipped_by_reason", {}))
        self.lost: Counter = Counter(stats.get("lost_by_shard", {}))

    def add(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            if len(self.errors) < MAX_ERRORS_LOGGED:
                where = f"key={rec['key']}" if rec["key"] else f"after key={rec.get('after')}"
                log.warning("loader: %s %s url=%s lost=%s: %s", rec["reason"], where, rec["url"], rec["lost"],
                            rec["detail"])
            self.errors.append(rec)
            self.reasons[rec["reason"]] += 1
            if rec["lost"]:
                self.lost[rec["url"]] += rec["lost"]
        if records:
            self.stats["skipped"] = len(self.errors)
            self.stats["skipped_by_reason"] = dict(sorted(self.reasons.items()))
            self.stats["lost"] = sum(self.lost.values())
            self.stats["lost_by_shard"] = dict(sorted(self.lost.items()))


def _empty_stats(**extra: Any) -> dict[str, Any]:
    return {**extra, "samples": 0, "skipped": 0, "skipped_by_reason": {}, "lost": 0, "lost_by_shard": {}}


# --------------------------------------------------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------------------------------------------------
class ShardLoader:
    """Iterable of batches over WebDataset shards; one ``for`` loop = one epoch.

    URLs are local paths, brace patterns (``.../train2017-{000000..000003}.tar``), ``pipe:`` commands or any fsspec
    URL (``s3://``, ``memory://`` ...). A sample is ``{"key", "url", "image": bytes | uint8 (3, H, W) RGB, "meta":
    the shard's json member ({"image": COCO record, "annotations": [...]}), "seg": uint8 (H, W) | None}``.

    Rank and world size come from the arguments, else :mod:`components.dist`. ``resampled=True`` (training): every
    rank and worker draws shards with replacement (seeded by ``(seed, epoch, rank)`` and the worker id) and each rank
    yields exactly ``samples_per_epoch // world_size // batch_size`` batches, so DDP never waits for a rank that ran
    out. ``resampled=False`` (one pass): the shard list is permuted by ``(seed, epoch)``, the same on every rank, then
    split disjointly over ranks and loader workers; it needs at least ``world_size * max(1, num_workers)`` shards.
    Samples are also shuffled in a buffer, and each worker's RNGs are seeded from ``(seed, epoch, rank, worker)``
    (so ``map_fn``'s random crops are repeatable; with ``num_workers=0`` the caller's RNGs are left alone).

    Corrupt and lost data is skipped and recorded with its shard URL; given ``expected_counts`` (``{url: samples}``),
    every sample a shard visit did not deliver is counted exactly. Attributes after (or during) an epoch: ``stats =
    {"epoch", "batches", "samples", "skipped", "skipped_by_reason", "lost", "lost_by_shard"}`` and ``errors`` (one
    record per problem: reason, url, key, lost, detail), summed over workers; a one-line summary is logged at the end
    of each epoch. ``set_epoch(e)`` changes the shuffling/resampling seeds for the next loop (as DistributedSampler).
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
        expected_counts: Mapping[str, int] | None = None,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
        if decode not in ("rgb", "bytes"):
            raise ValueError(f"decode={decode!r}: must be 'rgb' (uint8 tensors) or 'bytes' (JPEG bytes)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.urls = expand_urls(urls)
        _check_local(self.urls)
        self.expected = _check_expected(self.urls, expected_counts)
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
        self.stats: dict[str, Any] = _empty_stats(epoch=epoch, batches=0)
        self.errors: list[dict[str, Any]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.resampled and self.num_batches is not None:
            return self.num_batches
        raise TypeError("len() of a non-resampled ShardLoader is not known before the pass (pass resampled=True)")

    def _shards(self):
        """The shard-list stages: which shards this rank and worker read, in which order."""
        if self.resampled:
            # every rank and worker draws from all shards; deterministic=True: the seed is make_seed(worker id,
            # iteration 0, our (seed, epoch, rank) seed), never the time or the pid
            return [wds.ResampledShards(self.urls, seed=_seed(self.seed, self.epoch, self.rank) & 0x7FFFFFFF,
                                        worker_seed=_worker_id, deterministic=True)]
        # the same permutation on every rank (no rank in the seed), so the rank slices are disjoint. wds.slice, not
        # wds.split_by_node: that one reads the rank from RANK/WORLD_SIZE or the default process group, not from our
        # arguments (test_two_ranks_two_workers_disjoint_cover builds both ranks' loaders in one process)
        order = wds.SimpleShardList(self.urls, seed=_seed(self.seed, self.epoch, 0x5A4D) if self.shuffle else None)
        return [order, wds.slice(self.rank, None, self.world_size), wds.split_by_worker]

    def _pipeline(self) -> wds.DataPipeline:
        errors = ErrorLog()  # one per process: pickled with the pipeline into each worker
        # resampled: give up after this many visits in a row without a sample (every shard unreadable) instead of
        # drawing forever
        max_empty = 3 * len(self.urls) + 10 if self.resampled else None
        stages = [*self._shards(), ReadShards(errors, self.expected, max_empty=max_empty)]
        if self.shuffle and self.shuffle_buffer > 1:
            stages.append(_Shuffle(self.shuffle_buffer, self.seed, self.epoch, self.rank))
        stages.append(_decode(errors, self.decode, self.with_seg))
        if self.map_fn is not None:
            stages.append(wds.map(self.map_fn))  # a bug in map_fn is the consumer's: it raises, it is not counted
        stages += [wds.batched(self.batch_size, collation_fn=_Collate(self.collate_fn), partial=not self.drop_last),
                   _AttachErrors(errors)]
        ds = wds.DataPipeline(*stages)
        if self.resampled:  # each worker stops after its share; the loader takes the first num_batches in order
            ds = ds.with_epoch(nbatches=-(-self.num_batches // max(1, self.num_workers)))
        return ds

    def _source(self, ds: wds.DataPipeline):
        if self.num_workers == 0:
            return ds
        kw: dict[str, Any] = dict(
            # batch_size=None: workers already batch; _pass_through: skip DataLoader's default_convert, which would
            # walk every annotation list of every sample in Python
            batch_size=None, collate_fn=_pass_through, num_workers=self.num_workers, pin_memory=self.pin_memory,
            worker_init_fn=_SeedWorker(self.seed, self.epoch, self.rank),
            generator=torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.rank)),
        )
        if self.prefetch_factor is not None:
            kw["prefetch_factor"] = self.prefetch_factor
        loader = wds.WebLoader(ds, **kw)
        # in-order round robin over workers: the first num_batches are the same batches on every run
        return loader.with_epoch(self.num_batches) if self.resampled else loader

    def __iter__(self) -> Iterator[Any]:
        source = self._source(self._pipeline())
        self.stats, self.errors = _empty_stats(epoch=self.epoch, batches=0), []
        tally = _Tally(self.stats, self.errors)
        it = iter(source)
        try:
            for item in it:
                tally.add(item["errors"])
                if item["batch"] is None:
                    continue
                self.stats["batches"] += 1
                self.stats["samples"] += item["n"]
                yield item["batch"]
                if self.num_batches is not None and self.stats["batches"] >= self.num_batches:
                    break
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            del it, source  # drops the DataLoader iterator: its workers shut down now, not at garbage collection
            st = self.stats
            level = logging.WARNING if st["skipped"] else logging.INFO
            log.log(level, "loader: epoch %d rank %d: %d batches, %d samples, %d skipped %s, %d lost", self.epoch,
                    self.rank, st["batches"], st["samples"], st["skipped"], st["skipped_by_reason"], st["lost"])


def make_loader(urls, **options: Any) -> ShardLoader:
    """Batches ``collate_fn(list_of_samples)`` (default: the list itself) from WebDataset shards: a
    :class:`ShardLoader` with the same keyword options (``batch_size`` is required).

    ``decode="rgb"``: ``sample["image"]`` is a uint8 (3, H, W) RGB tensor; ``"bytes"``: the original JPEG bytes (decode
    later, e.g. batched nvJPEG on the GPU: :func:`components.data.loading.decode.decode_batch`). ``map_fn(sample)`` and
    ``collate_fn`` run in the loader workers. ``expected_counts``: ``{url: samples}`` of every URL, to count lost
    samples exactly. Also ``shuffle_buffer``, ``pin_memory``, ``prefetch_factor``.
    """
    return ShardLoader(urls, **options)


class SampleIterator:
    """Samples of the given shards in a fixed order (shard order as given, tar order within), in this process.

    ``stats`` / ``errors`` count skipped and lost data as for :class:`ShardLoader` (exactly, given
    ``expected_counts``).
    """

    def __init__(self, urls, *, decode: str = "rgb", with_seg: bool = False,
                 expected_counts: Mapping[str, int] | None = None):
        if decode not in ("rgb", "bytes"):
            raise ValueError(f"decode={decode!r}: must be 'rgb' or 'bytes'")
        urls = expand_urls(urls)
        _check_local(urls)
        self._log = ErrorLog()
        ds = wds.DataPipeline(wds.SimpleShardList(urls), ReadShards(self._log, _check_expected(urls, expected_counts)),
                              _decode(self._log, decode, with_seg))
        self._it = iter(ds)
        self.stats: dict[str, Any] = _empty_stats()
        self.errors: list[dict[str, Any]] = []
        self._tally = _Tally(self.stats, self.errors)

    def __iter__(self) -> "SampleIterator":
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            sample = next(self._it)
        except StopIteration:
            self._tally.add(self._log.drain())
            if self.stats["skipped"]:
                log.warning("loader: %d samples, %d skipped %s, %d lost", self.stats["samples"],
                            self.stats["skipped"], self.stats["skipped_by_reason"], self.stats["lost"])
            raise
        self._tally.add(self._log.drain())
        self.stats["samples"] += 1
        return sample


def iterate_samples(urls, *, decode: str = "rgb", with_seg: bool = False,
                    expected_counts: Mapping[str, int] | None = None) -> SampleIterator:
    """Yield samples in a fixed order (evaluation); corrupt and lost ones are counted in ``.stats``."""
    return SampleIterator(urls, decode=decode, with_seg=with_seg, expected_counts=expected_counts)
