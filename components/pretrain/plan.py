"""The pretraining plan: everything derived from the config and the shard index before any expensive work (the
pretrain splits' shards, the batch split over ranks, schedule lengths, a signature of the data)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from components.data.shards.index import INDEX_NAME, expected_counts, join_root, read_index, split_urls
from components.errors import UserError


@dataclass(frozen=True)
class Plan:
    urls: tuple[str, ...]
    num_images: int
    samples_per_epoch: int
    world_size: int
    rank: int
    global_batch: int
    rank_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    data_signature: str  # changed shards -> a new run, never a resumed old one
    shard_samples: tuple[int, ...] = ()  # samples written to each shard of ``urls`` (index.json): lost-sample counts


def make_plan(cfg, shards_root: str | os.PathLike, world_size: int, rank: int) -> Plan:
    """Resolve shards, batch split and schedule lengths; UserError (one line) on anything that cannot work."""
    index = read_index(shards_root)
    splits = list(index.get("pretrain") or [])
    if not splits:
        raise UserError(f"{join_root(shards_root, INDEX_NAME)}: no 'pretrain' splits listed; re-run `slotcon shard`")
    urls: list[str] = []
    shard_samples: list[int] = []
    num_images = 0
    for split in splits:
        info = index["splits"].get(split)
        if info is None:
            raise UserError(f"{join_root(shards_root, INDEX_NAME)}: pretrain split {split!r} is not in 'splits'; "
                            "re-run `slotcon shard`")
        split_shards = split_urls(shards_root, split)
        counts = expected_counts(shards_root, split)
        urls += split_shards
        shard_samples += [counts[u] for u in split_shards]
        num_images += int(info["num_samples"])
    if not urls or num_images == 0:
        raise UserError(f"{shards_root}: the pretrain splits {splits} hold no shards/images; re-run `slotcon shard`")
    if cfg.batch_size % world_size:
        raise UserError(f"params: pretrain.batch_size={cfg.batch_size} is not divisible by world size {world_size}")
    samples = cfg.samples_per_epoch or num_images
    steps_per_epoch = samples // cfg.batch_size
    if steps_per_epoch < 1:
        raise UserError(f"params: pretrain.batch_size={cfg.batch_size} exceeds the {samples} samples per epoch; "
                        "lower batch_size or raise samples_per_epoch")
    signature = hashlib.sha256(
        json.dumps({s: index["splits"][s] for s in splits}, sort_keys=True, default=str).encode()
    ).hexdigest()[:12]
    return Plan(
        urls=tuple(urls), num_images=num_images, samples_per_epoch=steps_per_epoch * cfg.batch_size,
        world_size=world_size, rank=rank, global_batch=cfg.batch_size, rank_batch=cfg.batch_size // world_size,
        steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * cfg.epochs,
        warmup_steps=steps_per_epoch * cfg.warmup_epochs, data_signature=signature, shard_samples=tuple(shard_samples),
    )
