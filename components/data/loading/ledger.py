"""How much of a dataset a training run never received, per shard, over shard visits, epochs, ranks and resumes:
``lost_fraction`` (the share of ``index.json``'s samples the run cannot see), counted once however often a shard is
visited.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from components.data.loading.reading import SAMPLE_REASONS
from components.errors import UserError


class DataLossLedger:
    """Lost samples per shard of one dataset (``expected``: ``{url: samples written}``).

    A resampled run visits a shard many times and several ranks visit the same shard, so the visits' sum over-counts.
    What the run lost is a property of the data: shard ``u`` lost ``tar[u]`` samples where its tar broke (the most
    any visit lost: the damage is the same every time) plus the distinct samples ``bad[u]`` that were read but could
    not be used (found in a loader worker or on the device). Merging is a maximum, so it is idempotent: a resumed run
    that re-reads batches, or two ranks that both saw a shard, count it once. ``lost_fraction`` only grows as damaged
    shards are discovered, so stopping as soon as it passes a threshold never stops a run that a longer look would
    have let through; in resampled mode a shard never visited contributes nothing yet.
    """

    def __init__(self, expected: Mapping[str, int]):
        self.expected = {str(u): int(n) for u, n in expected.items()}
        self.urls = list(self.expected)
        self.tar: dict[str, int] = {}  # most samples one visit of the shard lost where its tar broke
        self.bad: dict[str, set[str]] = {}  # keys read from the shard but unusable
        self.merged: dict[str, int] = {}  # every rank's count at the last merge (maximum)

    # -- recording ---------------------------------------------------------------------------------------------------
    def add_records(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Loader records (``loader.errors``); those of URLs outside the dataset, or without a known loss, are
        ignored."""
        for rec in records:
            url, lost = rec.get("url"), rec.get("lost")
            if url not in self.expected or not lost:
                continue
            if rec["reason"] in SAMPLE_REASONS and rec.get("key"):
                self.bad.setdefault(url, set()).add(str(rec["key"]))
            else:
                self.tar[url] = max(self.tar.get(url, 0), int(lost))

    def add_dropped(self, dropped: Iterable[tuple[str, str]]) -> None:
        """``(url, key)`` of images dropped after the loader (the device decoder could not decode them)."""
        for url, key in dropped:
            if url in self.expected:
                self.bad.setdefault(url, set()).add(str(key))

    # -- figures -----------------------------------------------------------------------------------------------------
    def _local(self, url: str) -> int:
        return min(self.expected[url], self.tar.get(url, 0) + len(self.bad.get(url, ())))

    def per_shard(self) -> dict[str, int]:
        """``{url: lost samples}`` of the shards that lost any (this rank's view joined with the last merge)."""
        out = {u: max(self._local(u), self.merged.get(u, 0)) for u in self.urls}
        return {u: n for u, n in out.items() if n}

    @property
    def lost(self) -> int:
        return sum(self.per_shard().values())

    @property
    def total(self) -> int:
        return sum(self.expected.values())

    @property
    def fraction(self) -> float:
        return self.lost / self.total if self.total else 0.0

    # -- ranks -------------------------------------------------------------------------------------------------------
    def merge(self, device: torch.device | str = "cpu") -> None:
        """Join every rank's counts (element-wise maximum over ranks; a collective: call it on every rank at the same
        point). Without a process group it only folds this rank's counts in."""
        counts = torch.tensor([max(self._local(u), self.merged.get(u, 0)) for u in self.urls], dtype=torch.float64,
                              device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
        self.merged = {u: int(n) for u, n in zip(self.urls, counts.tolist()) if n}

    def check(self, max_fraction: float, what: str = "pretrain") -> None:
        """One-line UserError when more than ``max_fraction`` of the dataset is lost (0: any loss stops). Call after
        :meth:`merge` so every rank decides on the same numbers."""
        if self.lost == 0 or self.fraction <= max_fraction:
            return
        worst = sorted(self.per_shard().items(), key=lambda kv: -kv[1])
        shards = ", ".join(f"{u}: {n}" for u, n in worst[:3]) + (f" (+{len(worst) - 3} more)" if len(worst) > 3 else "")
        raise UserError(f"{what}: {self.lost} of {self.total} samples ({self.fraction:.2%}) of the shards are lost "
                        f"({shards}), above max_lost_fraction={max_fraction:g}; re-create the shards (`slotcon shard`; "
                        "`slotcon shard --verify` names the damage) or raise max_lost_fraction")

    # -- checkpoints ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"tar": dict(self.tar), "bad": {u: sorted(k) for u, k in self.bad.items()},
                "merged": dict(self.merged)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Joins (maximum / union) the saved counts into the current ones: loading is idempotent too."""
        for u, n in state.get("tar", {}).items():
            if u in self.expected:
                self.tar[u] = max(self.tar.get(u, 0), int(n))
        for u, keys in state.get("bad", {}).items():
            if u in self.expected:
                self.bad.setdefault(u, set()).update(keys)
        for u, n in state.get("merged", {}).items():
            if u in self.expected:
                self.merged[u] = max(self.merged.get(u, 0), int(n))
