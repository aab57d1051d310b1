"""``slotcon export``: the pretrained method's trunk -> ``models/backbone.pt`` with torchvision key names.

Each method names the trunk it transfers (``backbone_prefix`` in ``last.pt``), so the conversion is a prefix strip
checked by a strict load into torchvision (:func:`convert_checkpoint`). Output: ``{"arch", "state_dict",
"source"}``; with ``export.register_model`` the backbone is also registered in MLflow (:func:`run_export`).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torchvision

from components.backbone import ARCHS, build_resnet, build_vit, clean_keys, is_vit, vit_image_size
from components.errors import UserError
from components.io import read_torch_file, save_torch_atomic
from components.pretrain.artifact import PretrainArtifact
from components.stage import Arg, Stage
from components.tracking.lineage import file_md5

PREFIX = "teacher_encoder.backbone."  # SlotCon's (files written before last.pt recorded its method's prefix)


def build_backbone(arch: str, state_dict: Mapping[str, torch.Tensor] | None = None,
                   image_size: int | None = None) -> torch.nn.Module:
    """The exported model of ``arch``, never downloading, optionally loaded strictly from ``state_dict``.

    ResNets: ``torchvision.models.<arch>(weights=None)`` with ``fc = Identity``; forward ``(B, 3, H, W) -> (B, C)``
    pooled features (C = 512 for resnet18/34, 2048 for resnet50+). ViTs: ``torchvision.models.VisionTransformer``
    with ``heads = Identity`` for ``image_size`` px (default: the size of ``state_dict``'s position embedding, else
    224); forward ``(B, 3, S, S) -> (B, D)`` class-token features.
    """
    if is_vit(arch):
        if image_size is None:
            image_size = vit_image_size(arch, state_dict) if state_dict is not None else 224
        model = build_vit(arch, image_size, head="identity")
    else:
        model = build_resnet(arch, head="identity")
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def teacher_backbone_state(model_state: Mapping[str, torch.Tensor], prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with the prefix removed (``module.`` from DDP dropped first), minus a classifier
    (``fc.*`` / ``heads.*``); tensors cloned to CPU. (The prefix picks the method's trunk, not only a teacher.)"""
    sd = clean_keys(model_state)
    out = {k[len(prefix):]: v.detach().cpu().clone() for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in out.items() if not k.startswith(("fc.", "heads."))}


def _arch_of(art: PretrainArtifact) -> str | None:
    arch = art.arch
    if arch is None and isinstance(art.model_kwargs, dict):
        arch = art.model_kwargs.get("arch")
    return arch


def convert_checkpoint(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """Pretrain checkpoint -> ``(arch, torchvision state_dict, source info)``; UserError naming the file if bad.

    The trunk is the one the checkpoint's method transfers (``backbone_prefix`` in ``last.pt``): SlotCon the teacher
    (EMA) ResNet (the official ``convert_pretrain_to_*`` scripts take ``encoder_k``), SIM the online ViT encoder
    (what the released fine-tuning loads), MoCo v2 the query encoder. Both kinds of trunk are torchvision modules
    (``teacher_encoder.backbone.layer1.0.conv1.weight -> layer1.0.conv1.weight``); the result loads with
    ``strict=True`` into ``torchvision.models.<arch>()`` with ``fc = Identity()`` (ResNets) or into
    ``torchvision.models.VisionTransformer`` of the arch and the pretraining image size (read back from the position
    embedding) with ``heads = Identity()`` (ViTs) -- checked before returning.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: pretrain checkpoint not found; run `dvc repro pretrain` first")
    art = PretrainArtifact.load(path)
    arch = _arch_of(art)
    if arch not in ARCHS:
        raise UserError(f"{path}: checkpoint names no known arch (got {arch!r}); it was not written by slotcon pretrain")
    prefix = art.backbone_prefix or PREFIX
    sd = teacher_backbone_state(art.model, prefix)
    if not sd:
        raise UserError(f"{path}: no '{prefix}*' weights in the checkpoint's model; is it a pretrain checkpoint?")
    try:
        build_backbone(arch, sd)
    except RuntimeError as exc:
        raise UserError(f"{path}: the {art.method} backbone does not load into torchvision "
                        f"{arch}: {str(exc).splitlines()[0]}") from None
    source = {"checkpoint": str(path), "epoch": art.epoch, "step": art.step, "method": art.method}
    if isinstance(art.model_kwargs, dict) and art.model_kwargs.get("image_size"):
        source["image_size"] = int(art.model_kwargs["image_size"])
    return arch, sd, source


def load_backbone(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """``models/backbone.pt`` -> ``(arch, state_dict)`` (torchvision keys minus ``fc.*``); UserError if bad."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: backbone not found; run `dvc repro export` (slotcon export) first")
    obj = read_torch_file(path, "backbone file", "re-run `slotcon export`")
    if not isinstance(obj, dict) or obj.get("arch") not in ARCHS or not isinstance(obj.get("state_dict"), dict):
        raise UserError(f"{path}: expected {{'arch': one of {ARCHS}, 'state_dict': {{...}}}}; re-run `slotcon export`")
    return obj["arch"], obj["state_dict"]


def registered_model_name(base: str, method: str) -> str:
    """The registered model a method's backbone is a version of: ``base`` for SlotCon (what the registry always
    held), ``<base>-<method>`` for the others: versions of one registered model should be interchangeable for
    whoever loads ``models:/name@alias``, and a ViT that only takes its pretraining image size and a ResNet are not."""
    return base if method == "slotcon" else f"{base}-{method}"


def checkpoint_method(path: str | os.PathLike) -> str:
    """The method that wrote a pretrain checkpoint (``slotcon`` for files without one, or unreadable ones: the
    export itself then reports what is wrong). Memory-maps the file: no tensor is read."""
    return PretrainArtifact.method_of(path)


def _trunk_name(source: Mapping[str, Any]) -> str:
    """Which network of the method the export holds (what each method transfers)."""
    return {"slotcon": "teacher backbone", "sim": "online encoder",
            "mocov2": "query encoder"}.get(str(source["method"]), "backbone")


def run_export(cfg, checkpoint: str | os.PathLike, out: str | os.PathLike, tracker=None,
               registered_model: str = "slotcon-backbone") -> dict[str, Any]:
    """Convert ``checkpoint``'s transferred trunk, write ``out`` atomically, and (optionally) register it in MLflow.

    ``cfg`` is the :class:`~components.config.ExportConfig`; returns a small summary dict. The new registry version
    gets the alias ``@candidate``, a description and tags (arch, source step, git commit, and the md5s of ``out`` and
    ``checkpoint`` by which the downstream stages find it to add their AP / mIoU as tags); promoting it to
    ``@champion`` is the explicit step ``python -m pipelines.registry promote``. A registry failure (store locked or
    gone) is a warning: ``out`` is written either way.
    """
    arch, sd, source = convert_checkpoint(checkpoint)
    save_torch_atomic({"arch": arch, "state_dict": sd, "source": source}, out)
    n_params = sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    summary: dict[str, Any] = {"arch": arch, "num_tensors": len(sd), "num_params": n_params, **source}
    if tracker is not None and tracker.active:
        tracker.log_params({"arch": arch, "source_checkpoint": str(checkpoint)}, prefix="export.")
        if cfg.register_model:
            tags = {"arch": arch, "source_step": source.get("step"), "source_checkpoint": str(checkpoint),
                    "slotcon.backbone_md5": file_md5(out), "slotcon.checkpoint_md5": file_md5(checkpoint)}
            description = (f"{arch} {_trunk_name(source)} of {source['method']} pretraining "
                           f"({source.get('step')} steps), torchvision "
                           f"{'VisionTransformer' if is_vit(arch) else 'ResNet'} keys. Downstream stages add their "
                           "headline figures as tags (detect.bbox_AP, segment.mIoU, unsup_seg.mIoU).")
            try:
                summary.update(_log_model(tracker, build_backbone(arch, sd).eval(), registered_model,
                                          description=description, tags=tags))
            except Exception as exc:  # noqa: BLE001 - the registry is a record; the backbone file is the output
                print(f"slotcon export: warning: backbone not registered in MLflow ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); re-run `dvc repro -f export` to register it",
                      file=sys.stderr)
    print(f"slotcon export: {arch} {_trunk_name(source)} ({n_params:,} parameters, step {source['step']}) -> {out}")
    return summary


def _log_model(tracker, model: torch.nn.Module, registered_model: str, *, description: str = "",
               tags: dict[str, Any] | None = None, alias: str = "candidate") -> dict[str, Any]:
    """Log ``model`` in ``tracker``'s run, register a new version of ``registered_model`` with ``description``,
    ``tags`` and ``@alias``; returns ``{"model_uri", "model_version"}``."""
    import mlflow  # lazy: mlflow costs ~1 s at start-up; only export.register_model needs it

    class _NoPickleNotice(logging.Filter):  # we choose pickle on purpose (see below): no warning on every export
        def filter(self, record: logging.LogRecord) -> bool:
            return "pickle" not in record.getMessage().lower()

    quiet = _NoPickleNotice()
    loggers = [logging.getLogger(n) for n in ("mlflow.pytorch", "mlflow.models.model", "mlflow")]
    for lg in loggers:
        lg.addFilter(quiet)
    active = mlflow.active_run()
    ctx = mlflow.start_run(run_id=tracker.run_id) if active is None or active.info.run_id != tracker.run_id else None
    size = int(getattr(model, "image_size", 224))
    try:
        info = mlflow.pytorch.log_model(
            model,
            name="backbone",
            registered_model_name=registered_model,
            # pickle: loads back as the torchvision module (pt2 would need a torch.export trace, seconds per export)
            serialization_format="pickle",
            # -> a tensor signature in the model card (a ViT takes only its own image size)
            input_example=np.zeros((1, 3, size, size), dtype=np.float32),
            # explicit: inferring requirements would import/probe the environment (and may try the network)
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"torchvision=={torchvision.__version__.split('+')[0]}"],
        )
    finally:
        if ctx is not None:
            mlflow.end_run()
        for lg in loggers:
            lg.removeFilter(quiet)
    version = str(info.registered_model_version) if info.registered_model_version is not None else None
    if version is not None:
        client = tracker._client or mlflow.MlflowClient()
        client.update_registered_model(registered_model, description=(
            "SlotCon pretrained backbones (torchvision ResNet keys), one version per `slotcon export`. Aliases: "
            "@candidate = the newest export, @champion = promoted with `python -m pipelines.registry promote`."))
        if description:
            client.update_model_version(registered_model, version, description=description)
        for k, v in (tags or {}).items():
            client.set_model_version_tag(registered_model, version, k, str(v))
        client.set_registered_model_alias(registered_model, alias, version)
    return {"model_uri": info.model_uri, "model_version": version}


def _run_stage(ctx) -> None:
    method = checkpoint_method(ctx.args.checkpoint)
    run_export(ctx.cfg, ctx.args.checkpoint, ctx.args.out, tracker=ctx.tracker,
               registered_model=registered_model_name(ctx.tracking_cfg.registered_model, method))


STAGE = Stage(
    name="export", section="export", run=_run_stage,
    args=(Arg("checkpoint", "models/pretrain/last.pt", "pretrain output (last.pt)"),
          Arg("out", "models/backbone.pt", "torchvision-keyed backbone file")),
)
