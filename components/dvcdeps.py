"""``slotcon deps``: each ``dvc.yaml`` stage's code dependencies are the files its command can import.

A stage's command is ``slotcon <name> ...``; what it can execute is the import closure of ``components.cli`` and of
the stage's module (see :mod:`components.codegraph`). A folder whose every module is in the closure is listed as the
folder, so a file added there (a new pretraining method) needs no edit here. ``--check`` fails naming what is
missing or extra; without it the ``components/`` entries of each stage's ``deps`` are rewritten in place (the rest of
the file, comments included, is kept).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from components import cli, codegraph
from components.errors import UserError
from components.io import write_text_atomic

_CODE = re.compile(r"^(\s+)- (components/\S*)\s*$")


def stage_modules(dvc_yaml: dict) -> dict[str, str]:
    """dvc stage -> the module its ``slotcon <name>`` command runs (stages with another command are left out)."""
    out = {}
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        words = str(stage.get("cmd", "")).split()
        if len(words) >= 2 and words[0] == "slotcon" and words[1] in cli.STAGES:
            out[name] = cli.STAGES[words[1]][0]
    return out


def code_deps(module: str, root: str | Path = ".") -> list[str]:
    """The closure of ``module`` (plus the CLI that routes to it) as paths, whole folders where all is covered."""
    root = Path(root).resolve()
    modules, _ = codegraph.graph(root)
    needed = codegraph.closure("components.cli", root) | codegraph.closure(module, root)
    files = {modules[m].relative_to(root).as_posix() for m in needed}
    every = [p.relative_to(root).as_posix() for m, p in modules.items() if m.startswith("components")]
    folders = {str(Path(f).parent.as_posix()) for f in every}
    for f in every:  # every ancestor folder below components/ is a candidate too
        parts = Path(f).parent.parts
        folders.update("/".join(parts[:i]) for i in range(2, len(parts)))
    covered = {d for d in folders if d != "components" and all(f in files for f in every if f.startswith(d + "/"))}
    top = {d for d in covered if str(Path(d).parent.as_posix()) not in covered}
    out = set(top)
    out.update(f for f in files if not any(f.startswith(d + "/") for d in top))
    return sorted(out)


def _listed(stage: dict) -> list[str]:
    return [d for d in (stage.get("deps") or []) if isinstance(d, str) and d.startswith("components/")]


def differences(path: str | Path = "dvc.yaml") -> dict[str, tuple[list[str], list[str]]]:
    """stage -> (missing, extra) code deps of ``dvc.yaml`` against the import closure; empty when all agree."""
    path = Path(path)
    spec = yaml.safe_load(path.read_text()) or {}
    out = {}
    for name, module in stage_modules(spec).items():
        want, have = code_deps(module, path.parent), _listed(spec["stages"][name])
        missing, extra = [d for d in want if d not in have], [d for d in have if d not in want]
        if missing or extra or len(have) != len(set(have)):
            out[name] = (missing, extra)
    return out


def rewrite(path: str | Path = "dvc.yaml") -> str:
    """``dvc.yaml``'s text with each stage's ``components/`` deps replaced by its closure, the rest untouched."""
    path = Path(path)
    spec = yaml.safe_load(path.read_text()) or {}
    modules = stage_modules(spec)
    lines, out, stage, placed = path.read_text().splitlines(), [], None, False
    for line in lines:
        head = re.match(r"^  ([A-Za-z0-9_-]+):\s*$", line)
        if head:
            stage, placed = head.group(1), False
        code = _CODE.match(line)
        if code and stage in modules:
            if not placed:
                out.extend(f"{code.group(1)}- {d}" for d in code_deps(modules[stage], path.parent))
                placed = True
            continue
        out.append(line)
    text = "\n".join(out) + "\n"
    unplaced = [s for s in modules if not _listed(spec["stages"][s])]
    if unplaced:
        raise UserError(f"{path}: stages {unplaced} list no components/ dep to replace; add one line "
                        "`- components/cli.py` under their deps and run `slotcon deps` again")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dvc-yaml", default="dvc.yaml", help="the pipeline file (default: dvc.yaml)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 naming each stage that differs")


def main(args: argparse.Namespace) -> int:
    path = Path(args.dvc_yaml)
    if not path.is_file():
        raise UserError(f"{path}: no such file; run from the repository root or pass --dvc-yaml")
    diff = differences(path)
    if args.check:
        for name, (missing, extra) in diff.items():
            print(f"{path}: stage {name}: missing {missing or '-'}, extra {extra or '-'}; run `slotcon deps`",
                  file=sys.stderr)
        return 1 if diff else 0
    if diff:
        write_text_atomic(path, rewrite(path))
    print(f"{path}: code deps of {len(stage_modules(yaml.safe_load(path.read_text())))} stages "
          f"{'rewritten' if diff else 'already exact'}")
    return 0
