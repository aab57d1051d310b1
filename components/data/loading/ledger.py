"""How much of a dataset a training run never received, per shard, over shard visits, epochs, ranks and resumes:
``lost_fraction`` (the share of ``index.json``'s samples the run cannot see), counted once however often a shard is
visited; :class:`SplitLoss` keeps the same account for one split a downstream stage reads.
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


class SplitLoss:
    """What a downstream stage (detect, segment, probe, unsup_seg, viz) lost of one split, on the same
    :class:`DataLossLedger` pretraining uses: loader records in (:meth:`add`), samples the stage itself could not use
    in (:meth:`drop`), the same stop rule out (:meth:`check`), and the figures its details report (:meth:`figures`:
    ``lost_samples``, ``lost_fraction`` as pretraining's, plus ``expected_samples`` and ``lost_by_reason``)."""

    def __init__(self, expected: Mapping[str, int], split: str):
        self.ledger, self.split = DataLossLedger(expected), split
        self.reasons: dict[str, dict[str, int]] = {}  # reason -> {shard url, or url + key of a sample: lost}

    @property
    def expected(self) -> dict[str, int]:
        return self.ledger.expected

    def note(self, reason: str, where: str, lost: int) -> None:
        """``lost`` samples of ``reason`` at ``where`` (a shard URL, or URL#key), counted once (a maximum)."""
        seen = self.reasons.setdefault(reason, {})
        seen[where] = max(seen.get(where, 0), lost)

    def add(self, records: Iterable[Mapping[str, Any]]) -> None:
        records = list(records)
        self.ledger.add_records(records)
        for rec in records:
            if rec.get("url") in self.ledger.expected and rec.get("lost"):
                per_sample = rec["reason"] in SAMPLE_REASONS and rec.get("key")
                self.note(rec["reason"], f"{rec['url']}#{rec['key']}" if per_sample else rec["url"], int(rec["lost"]))

    def drop(self, url: str, key: str, reason: str) -> None:
        """A sample read from the shard that the stage cannot use (e.g. a labelled sample without its map)."""
        if url in self.ledger.expected:
            self.ledger.add_dropped([(url, key)])
            self.note(reason, f"{url}#{key}", 1)

    def check(self, max_fraction: float, what: str, *, merge: bool = False) -> None:
        """One-line UserError naming the worst shards when more than ``max_fraction`` of the split is lost.
        ``merge``: join every rank's counts first (a collective: every rank at the same point)."""
        if merge:
            dev: Any = "cpu"
            if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                    torch.distributed.get_backend() == "nccl":
                dev = torch.device("cuda", torch.cuda.current_device())
            self.ledger.merge(dev)
        self.ledger.check(max_fraction, f"{what}: {self.split}")

    def figures(self) -> dict[str, Any]:
        return {"lost_samples": self.ledger.lost, "lost_fraction": self.ledger.fraction,
                "expected_samples": self.ledger.total,
                "lost_by_reason": {r: sum(v.values()) for r, v in sorted(self.reasons.items())},
                "lost_by_shard": {u.rsplit("/", 1)[-1]: n for u, n in self.ledger.per_shard().items()}}


def loss_details(losses: Iterable[SplitLoss]) -> dict[str, Any]:
    """A stage's details from the splits it read: ``lost_samples`` / ``lost_fraction`` over all of them (pretraining's
    keys) and ``lost_by_split`` (each split's :meth:`SplitLoss.figures`)."""
    per = {s.split: s.figures() for s in losses}
    lost, total = sum(f["lost_samples"] for f in per.values()), sum(f["expected_samples"] for f in per.values())
    return {"lost_samples": lost, "lost_fraction": lost / total if total else 0.0, "lost_by_split": per}
