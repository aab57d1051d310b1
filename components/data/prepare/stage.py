"""Stage ``prepare``: discover and check the source ``params.yaml: data.source`` names, write per-split Parquet
manifests and ``index.json`` (what ``shard`` reads). Raw images stay where they are: the shards are the versioned
artifact, and the manifests' hashes make DVC re-run ``shard`` when an image changes.
"""
from __future__ import annotations

import os
from typing import Any

from components.data.prepare.coco import run_prepare_coco
from components.data.prepare.tree import run_prepare_tree
from components.data.workers import NO_PROGRESS, stage_run
from components.stage import Arg, Stage

TREE_SOURCES = ("imagenet", "folder")


def run_prepare(
    cfg, scenes_root: str | os.PathLike, out_dir: str | os.PathLike, *, tracker=None, progress: bool = True
) -> dict[str, Any]:
    """Discover and check ``cfg.source``; write ``<out>/<source>/<split>/manifest.parquet`` and ``<out>/index.json``.

    ``cfg`` is the ``data`` section. Sources: ``scenes`` (the generated dataset at ``scenes_root``, in COCO's layout),
    ``coco`` (a COCO root as COCO ships it: ``train2017/``, ``val2017/``, ``annotations/instances_*2017.json``,
    optionally COCO-Stuff's ``stuffthingmaps_trainval2017/``), ``cocoplus`` (COCO plus ``unlabeled2017/``) -- see
    :func:`components.data.prepare.coco.run_prepare_coco`; ``imagenet`` and ``folder`` (ImageNet-1K layouts or any
    tree of images at ``data.root``; streamed, resumable) -- see :func:`components.data.prepare.tree.run_prepare_tree`.
    A whole unusable source is a one-line UserError; a bad single image is skipped and counted (manifest metadata and
    the returned metrics: counts per split and per skip reason).
    """
    if cfg.source in TREE_SOURCES:
        return run_prepare_tree(cfg, out_dir, tracker=tracker, progress=progress)
    return run_prepare_coco(cfg, scenes_root, out_dir, tracker=tracker, progress=progress)


STAGE = Stage(
    name="prepare", section="data", run=stage_run(run_prepare, "scenes"), metrics="metrics/prepare.json",
    headline=("images", "skipped"),
    args=(Arg("scenes", "data/scenes", "root of the generated scenes (source: scenes)"),
          Arg("out", "data/raw", "output folder for manifests and index.json"), NO_PROGRESS),
)
