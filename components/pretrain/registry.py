"""The pretraining methods by name (``pretrain.method`` -> :class:`~components.pretrain.method.PretrainMethod`
subclass), and a method's model rebuilt from a ``last.pt`` for the downstream stages (:func:`open_pretrained`).

The classes are imported here, not looked up by string, so every stage that loads a model depends on the method code
in its import closure (the DVC deps).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from components.engine.checkpoint import clean_state_dict
from components.errors import UserError
from components.pretrain.artifact import PretrainArtifact
from components.pretrain.method import PretrainMethod
from components.pretrain.methods.mocov2.method import MocoV2Method
from components.pretrain.methods.sim.method import SimMethod
from components.pretrain.methods.slotcon.method import SlotConMethod

#: ``pretrain.method`` -> the :class:`PretrainMethod` subclass
METHODS: dict[str, type[PretrainMethod]] = {"slotcon": SlotConMethod, "sim": SimMethod, "mocov2": MocoV2Method}


def method_class(name: str) -> type[PretrainMethod]:
    if name not in METHODS:
        raise UserError(f"params: pretrain.method={name!r} is not known (allowed: {', '.join(METHODS)})")
    return METHODS[name]


class Pretrained(NamedTuple):
    artifact: PretrainArtifact
    method: type[PretrainMethod]
    model: torch.nn.Module  # eval mode, on the CPU


def open_pretrained(path: str | os.PathLike) -> Pretrained:
    """``models/pretrain/last.pt`` -> its artifact, its method's class and the method's model in eval mode on the CPU.

    The model class comes from the file's ``method`` (:data:`METHODS`; SlotCon for files that name none). Raises
    UserError naming the file if it is missing, unreadable, or its weights do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: pretrained model not found; run `dvc repro pretrain` (or `slotcon pretrain`) first")
    art = PretrainArtifact.load(path)
    kwargs = art.model_kwargs
    if not isinstance(kwargs, dict):
        raise UserError(f"{path}: no 'model_kwargs' entry; it was not written by `slotcon pretrain`")
    method = method_class(art.method)
    model = method.model_from_kwargs(kwargs)
    try:
        model.load_state_dict(clean_state_dict(art.model), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{path}: weights do not match the {art.method} model {kwargs}: {first}; re-run "
                        "`slotcon pretrain`") from None
    return Pretrained(art, method, model.eval())


def load_pretrained(path: str | os.PathLike) -> torch.nn.Module:
    """The method's model of a ``last.pt`` in eval mode on the CPU (see :func:`open_pretrained`)."""
    return open_pretrained(path).model
