"""The DVC pipeline as the flows see it: its stages in DAG order (DVC's own index), target selection, and params
overrides applied the way ``dvc exp run -S`` applies them (validated before anything runs)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import networkx as nx
from dvc.repo import Repo
from dvc.stage import PipelineStage
from dvc.utils.cli_parse import to_path_overrides
from dvc.utils.hydra import apply_overrides

from components.check import required_sections
from components.config import load_all


@dataclasses.dataclass(frozen=True)
class StageInfo:
    name: str  # DVC addressing: "pretrain", or "sub/dvc.yaml:stage" for nested pipelines
    upstream: tuple[str, ...]  # stages whose outs this stage depends on (direct)
    metrics: tuple[str, ...]  # metrics files declared in dvc.yaml, relative to the repo root
    plots: tuple[str, ...]


def load_stages(root: str | os.PathLike = ".") -> list[StageInfo]:
    """Every pipeline stage of the DVC repo at ``root``, in a topological order of DVC's own graph (networkx; ties
    broken by dvc.yaml order, so the order is deterministic and reads like the file)."""
    root = Path(root).resolve()
    # DVC names stages relative to the working directory ("dvc.yaml:a" elsewhere): read the index from the root
    with contextlib.chdir(root), Repo(str(root)) as repo:
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
        order = {s: i for i, s in enumerate(stages)}
        # DVC's edges point from a stage to the stages it depends on: reversed, they run in execution order
        graph = repo.index.graph.subgraph(stages).reverse(copy=True)

        def rel(out) -> str:
            return os.path.relpath(out.fs_path, root)

        return [
            StageInfo(
                name=s.addressing,
                upstream=tuple(u.addressing for u in sorted(graph.predecessors(s), key=order.__getitem__)),
                metrics=tuple(rel(o) for o in s.outs if o.metric),
                plots=tuple(rel(o) for o in s.outs if o.plot),
            )
            for s in nx.lexicographical_topological_sort(graph, key=order.__getitem__)
        ]


def select_stages(stages: Sequence[StageInfo], targets: Sequence[str] | None) -> list[StageInfo]:
    """The targets and everything upstream of them (what ``dvc repro <targets>`` would consider), in DAG order."""
    if not targets:
        return list(stages)
    by_name = {s.name: s for s in stages}
    unknown = [t for t in targets if t not in by_name]
    if unknown:
        raise ValueError(f"dvc.yaml: no stage(s) {unknown}; stages are: {', '.join(by_name)}")
    graph = nx.DiGraph([(u, s.name) for s in stages for u in s.upstream])
    graph.add_nodes_from(by_name)
    keep = set(targets).union(*(nx.ancestors(graph, t) for t in targets))
    return [s for s in stages if s.name in keep]


def normalize_overrides(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"pretrain.epochs": 5}`` or ``["pretrain.epochs=5"]`` -> DVC ``-S`` strings (``[file:]key=value``)."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        overrides = [overrides]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"params_overrides: {bad} must look like 'section.key=value' (e.g. pretrain.epochs=5)")
    return list(overrides)


@contextlib.contextmanager
def overridden_params(root: Path, overrides: list[str]) -> Iterator[list[Path]]:
    """Apply ``-S`` overrides to the params files the way ``dvc exp run -S`` does; restore the files on exit."""
    if not overrides:
        yield []
        return
    per_file = to_path_overrides(overrides)  # {"params.yaml": ["pretrain.epochs=5"], ...}
    saved: dict[Path, bytes] = {}
    try:
        for rel, ovs in per_file.items():
            path = root / rel
            saved[path] = path.read_bytes()
            apply_overrides(str(path), ovs)
        yield list(saved)
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


def exp_name_for(run_name: str) -> str:
    return "flow-" + (re.sub(r"[^A-Za-z0-9_-]", "-", run_name).strip("-") or "run")


def _apply_checked(copy: Path, overrides: list[str], params_file: str) -> None:
    """The overrides applied to ``copy``; a typo'd key or a malformed override is a one-line ``ValueError``."""
    for rel, ovs in to_path_overrides(overrides).items():
        if Path(rel).name != Path(params_file).name:
            raise ValueError(f"-S {ovs[0]!r}: only {params_file} can be overridden here")
        try:
            apply_overrides(str(copy), ovs)
        except Exception as exc:  # DVC wraps hydra's (multi-line) reason: keep its first line
            why = str(exc.__cause__ or exc).strip() or type(exc).__name__
            if why.startswith("Could not override"):
                raise ValueError(f"-S {' '.join(ovs)}: {why.splitlines()[0].removeprefix('Could not override ').rstrip('.')}"
                                 f" is not a key of {params_file} (a typo? keys: `slotcon check`)") from None
            raise ValueError(f"-S {' '.join(ovs)}: not a valid override ({why.splitlines()[0]}); "
                             "the form is section.key=value, e.g. -S pretrain.epochs=5") from None


def validate_request(root: Path, targets: Sequence[str] | None, overrides: list[str],
                     params_file: str = "params.yaml") -> list[StageInfo]:
    """Targets exist in dvc.yaml and the (overridden) params are valid: one-line ``ValueError`` / ``ConfigError``
    before Prefect starts anything. Returns the stages to run."""
    stages = select_stages(load_stages(root), targets)
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / Path(params_file).name
        shutil.copy2(root / params_file, copy)
        if overrides:
            _apply_checked(copy, overrides, params_file)
        (Path(d) / "dvc.yaml").write_bytes((root / "dvc.yaml").read_bytes())
        load_all(copy, required=required_sections(copy))
    return stages
