"""``models/pretrain/last.pt`` as a typed record: what the pretrain stage hands to export, unsup_seg and viz.

On disk it stays the plain dict of its fields (plus :attr:`PretrainArtifact.extra`), so readers by key (MLflow,
DVC, tests) keep working; a field the file lacks loads as None (and is not written back), ``method`` as SlotCon's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch

from components.engine.checkpoint import load_checkpoint
from components.io import load_torch_plain, save_torch_atomic

#: the method of a file written before ``last.pt`` named its method
LEGACY_METHOD = "slotcon"


@dataclass
class PretrainArtifact:
    model: dict[str, torch.Tensor] | None  # the whole model's state_dict (student, teacher, ...)
    model_kwargs: dict[str, Any] | None = None  # the method's model constructor arguments
    method: str = LEGACY_METHOD
    arch: str | None = None
    backbone_prefix: str | None = None  # state_dict prefix of the trunk export writes
    epoch: int | None = None
    step: int | None = None
    history: list[dict[str, float]] | None = None  # per epoch: {"epoch", <stat>: mean}
    config: dict[str, Any] | None = None  # the ``pretrain`` section of the run
    fingerprint_hash: str | None = None  # the checkpoint folder of the run
    metrics: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys (compare's random init: init, seed)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "PretrainArtifact":
        names = [f.name for f in fields(cls) if f.name != "extra"]
        known = {k: state[k] for k in names if k in state}
        known.setdefault("model", None)
        return cls(**known, extra={k: v for k, v in state.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        """The dict on disk: every field that is set (not None), then :attr:`extra`."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` atomically (temp file, fsync, rename)."""
        save_torch_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PretrainArtifact":
        """Read ``path`` with torch's restricted unpickler (no code in the file runs); UserError naming the file when
        it is not a readable pretrain checkpoint or holds pickled objects."""
        return cls.from_dict(load_checkpoint(path))

    @classmethod
    def method_of(cls, path: str | os.PathLike) -> str:
        """The method that wrote ``path``, without reading a tensor (memory-mapped); SlotCon's for a file that names
        none or cannot be read (whoever then reads it reports what is wrong)."""
        try:
            state = load_torch_plain(path, "cpu", mmap=True)
        except Exception:
            return LEGACY_METHOD
        return str(cls.from_dict(state).method) if isinstance(state, dict) else LEGACY_METHOD
