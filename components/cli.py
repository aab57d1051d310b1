"""``slotcon <stage>``: parse -> load the stage's params section -> call the stage's pure function -> write metrics.

Each stage module declares ``STAGE`` (a :class:`components.stage.Stage`: its options, params section and work; the
stage runtime does the rest); ``check`` exposes a plain ``main(args)``. This file only routes; modules are imported
lazily so ``slotcon --help`` is fast.
A :class:`~components.errors.UserError` (bad params, missing files) is printed as one line, exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from components.errors import UserError

# stage name -> (module, one-line help). Order = the DAG's order.
STAGES: dict[str, tuple[str, str]] = {
    "check": ("components.check", "validate every section of params.yaml and exit"),
    "scenes": ("components.data.scenes.stage", "generate the scene-centric demo dataset in COCO format"),
    "prepare": ("components.data.prepare.stage", "discover and check a source; write per-split Parquet manifests"),
    "shard": ("components.data.shards.stage", "write WebDataset shards + manifest (or --verify them)"),
    "pretrain": ("components.pretrain.stage", "self-supervised pretraining (SlotCon by default, SIM or MoCo v2) from shards; torchrun when asked"),
    "export": ("components.transfer.export", "teacher backbone -> models/backbone.pt (torchvision keys) + MLflow"),
    "detect": ("components.transfer.detect.stage", "Mask R-CNN FPN fine-tuning + COCO evaluation (AP^b, AP^m)"),
    "segment": ("components.transfer.segment.stage", "semantic segmentation: FCN / DeepLabv3+, supervised or semi-supervised (ClassMix, ReCo); mIoU"),
    "probe": ("components.transfer.probe", "frozen-trunk linear probes: dense (semantic) and object (box classes)"),
    "unsup_seg": ("components.transfer.unsup.stage", "prototypes or k-means clusters -> Hungarian-matched mIoU"),
    "viz": ("components.transfer.unsup.viz", "pictures of what the slots (or k-means clusters) found"),
}
# project tools beside the stages (not in dvc.yaml): same calling convention as ``check`` (a plain ``main(args)``)
TOOLS: dict[str, tuple[str, str]] = {
    "deps": ("components.dvcdeps", "write (or --check) each dvc.yaml stage's code deps: its module's import closure"),
    "params": ("components.config.params_file", "write (or --check) params.yaml from the schema's defaults and comments"),
    "stack": ("components.stack.cli", "the team stack here: up | down | status (PostgreSQL, S3, MLflow and Prefect servers)"),
}


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``stage``'s module is imported (to add its own options), so ``--help`` stays fast."""
    parser = argparse.ArgumentParser(prog="slotcon", description="SlotCon pipeline stages (see dvc.yaml).")
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for name, (module, help_text) in {**STAGES, **TOOLS}.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.set_defaults(_module=module)
        if name == stage:
            mod = importlib.import_module(module)
            spec = getattr(mod, "STAGE", None)  # a components.stage.Stage: the runtime adds its options
            if spec is not None:
                spec.add_arguments(p)
            elif hasattr(mod, "add_arguments"):
                mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(stage if stage in STAGES or stage in TOOLS else None).parse_args(argv)
    try:
        mod = importlib.import_module(args._module)
        spec = getattr(mod, "STAGE", None)
        rc = spec.main(args) if spec is not None else mod.main(args)
    except UserError as exc:
        print(f"slotcon {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
