"""``slotcon check``: validate params.yaml before any work (the Prefect flow runs it first; in ``dvc.yaml`` it is the
``check`` stage upstream of every other stage, so a plain ``dvc repro`` stops on a params typo *before* DVC deletes
the outputs of the stage whose section is wrong).

Required sections: ``tracking`` (every stage reads it) and every section a stage of the ``dvc.yaml`` beside the
params file depends on; without a ``dvc.yaml`` there, all sections. Sections present are validated whether required
or not. Absent, empty file, unknown keys, bad values, YAML syntax errors, duplicated keys: one line, exit status 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from components.config import SECTIONS, load_all, parse_yaml
from components.errors import UserError
from components.tracking.store import StoreError, artifact_uri


def sections_used_by(dvc_yaml: Path, params_file: Path) -> set[str] | None:
    """Sections of ``params_file`` that the stages of ``dvc_yaml`` list under ``params:`` (None: no dvc.yaml)."""
    if not dvc_yaml.is_file():
        return None
    spec: Any = parse_yaml(dvc_yaml.read_text(), dvc_yaml) or {}
    used: set[str] = set()
    for stage in (spec.get("stages") or {}).values():
        for entry in (stage or {}).get("params") or []:
            if isinstance(entry, str):  # "pretrain" or "pretrain.epochs": the default params file
                if params_file.name == "params.yaml":
                    used.add(entry.split(".")[0])
            elif isinstance(entry, dict):  # {"other.yaml": ["a.b", ...]}
                for fname, keys in entry.items():
                    if Path(fname).name == params_file.name:
                        used.update(str(k).split(".")[0] for k in keys or [])
    return used


def required_sections(params: str | Path) -> list[str]:
    path = Path(params)
    used = sections_used_by(path.resolve().parent / "dvc.yaml", path)
    if used is None:
        return list(SECTIONS)
    return [s for s in SECTIONS if s == "tracking" or s in used]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="write this marker file when valid (the DVC check stage's out)")


def main(args: argparse.Namespace) -> int:
    path = Path(args.params)
    sections = load_all(path, required=required_sections(path))
    tracking = sections.get("tracking")
    if tracking is not None and tracking.enabled:
        try:  # where artifacts would go (no store is opened): e.g. mlflow-artifacts: needs a server
            artifact_uri(tracking)
        except StoreError as exc:
            raise UserError(f"{args.params}: tracking: {exc}") from None
    print(f"{args.params}: {len(sections)} sections valid ({', '.join(sections)})")
    out = getattr(args, "out", None)
    if out:  # the check stage's DVC output: constant content, so downstream stages never re-run because of it
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("params.yaml valid\n")
    return 0
