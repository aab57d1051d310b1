"""Lineage in MLflow: which code (git commit, ``dvc.lock``) and data (MLflow datasets) a run came from, and which
registered backbone version its figures belong to.

- :func:`datasets_for`: a stage's input data as MLflow dataset inputs, one per split, digested by DVC's content hashes.
- :func:`tag_model_versions`: a downstream stage's headline figures as tags of the backbone version it evaluated.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping

from components.config import parse_yaml

# which splits of the shards a stage reads, by index.json role (default: train and val)
_SHARD_ROLES = {"pretrain": ("pretrain",), "unsup_seg": ("val",), "viz": ("val",)}


def file_md5(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """``HEAD``'s commit (``-dirty`` when tracked files changed), or ``unknown`` without git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dvc_lock_hash(path: str | os.PathLike = "dvc.lock") -> str:
    """md5 of ``dvc.lock`` (``none`` when there is none)."""
    p = Path(path)
    return hashlib.md5(p.read_bytes()).hexdigest() if p.is_file() else "none"


def _lock_entry(path: Path, root: Path) -> dict | None:
    """The ``dvc.lock`` outs entry of ``path`` (any stage), or None."""
    lock = root / "dvc.lock"
    try:
        data = parse_yaml(lock.read_text(), lock) or {}
        rel = os.path.relpath(path.resolve(), root.resolve())
    except Exception:  # noqa: BLE001 - no lock file: no DVC digest
        return None
    for st in (data.get("stages") or {}).values():
        for out in st.get("outs") or []:
            if out.get("path") == rel:
                return out
    return None


def _dir_listing(root: Path, md5: str) -> list[dict] | None:
    """DVC's ``.dir`` object (``[{"md5", "relpath"}, ...]``) from the local cache, or None."""
    if not md5.endswith(".dir"):
        return None
    for cache in (root / ".dvc" / "cache" / "files" / "md5", root / ".dvc" / "cache"):
        p = cache / md5[:2] / md5[2:]
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except ValueError:
                return None
    return None


def split_digest(folder: Path, split: str, index_entry: Mapping[str, Any], root: Path) -> tuple[str, str]:
    """``(digest, how)``: DVC's content hashes of the split's files (the ``.dir`` listing of the ``dvc.lock`` entry of
    ``folder``, restricted to the split), else a hash of its index.json entry."""
    entry = _lock_entry(folder, root)
    listing = _dir_listing(root, entry["md5"]) if entry and entry.get("md5") else None
    if listing is not None:
        files = sorted((e["relpath"], e["md5"]) for e in listing if e["relpath"].startswith(split + "/"))
        if files:
            return hashlib.md5(json.dumps(files).encode()).hexdigest(), "dvc"
    return hashlib.md5(json.dumps(index_entry, sort_keys=True).encode()).hexdigest(), "index.json"


def _dataset(name: str, digest: str, source: Path, profile: Mapping[str, Any], context: str) -> Any:
    from mlflow.entities import Dataset, DatasetInput, InputTag  # lazy: mlflow costs ~1 s at start-up

    ds = Dataset(name=name, digest=digest[:32], source_type="local",
                 source=json.dumps({"uri": source.resolve().as_uri()}), profile=json.dumps(dict(profile)))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])


def _shard_datasets(stage: str, shards: Path, root: Path) -> list[Any]:
    index = json.loads((shards / "index.json").read_text())
    splits = index.get("splits") or {}
    roles = _SHARD_ROLES.get(stage, ("train", "val"))
    wanted: list[tuple[str, str]] = []
    for role in roles:
        names = index.get(role) or []
        for split in [names] if isinstance(names, str) else names:
            if split in splits and split not in [w for w, _ in wanted]:
                wanted.append((split, "evaluation" if role == "val" else "training"))
    out = []
    for split, context in wanted:
        e = splits[split]
        digest, how = split_digest(shards, split, e, root)
        profile = {"num_samples": e.get("num_samples"), "shards": len(e.get("shards") or []), "bytes": e.get("bytes"),
                   "data_source": index.get("source"), "digest_from": how}
        out.append(_dataset(f"shards/{split}", digest, shards / split, profile, context))
    return out


def _folder_dataset(name: str, folder: Path, root: Path) -> list[Any]:
    entry = _lock_entry(folder, root)
    digest = (entry or {}).get("md5", "").removesuffix(".dir") or hashlib.md5(str(folder.resolve()).encode()).hexdigest()
    profile = {"files": (entry or {}).get("nfiles"), "bytes": (entry or {}).get("size"),
               "digest_from": "dvc" if entry else "path"}
    return [_dataset(name, digest, folder, profile, "training")]


def datasets_for(stage: str, args: Any, root: str | os.PathLike | None = None) -> list[Any]:
    """The MLflow dataset inputs of a stage, from its path arguments (``shards``, ``raw``, ``scenes``): one per shard
    split read (``shards/<split>``) or input folder, with its digest (:func:`split_digest`), source folder, profile
    (sample / shard counts, bytes, data source) and context (``training`` for a split the stage learns from,
    ``evaluation`` for val)."""
    root = Path(root or os.environ.get("DVC_ROOT") or os.getcwd())
    out: list[Any] = []
    shards = getattr(args, "shards", None)
    if shards and (Path(shards) / "index.json").is_file():
        out += _shard_datasets(stage, Path(shards), root)
    raw = getattr(args, "raw", None)
    if raw and Path(raw).is_dir():
        out += _folder_dataset("raw manifests", Path(raw), root)
    scenes = getattr(args, "scenes", None)
    if scenes and Path(scenes).is_dir():
        out += _folder_dataset("scenes", Path(scenes), root)
    return out


def tag_model_versions(stage: str, args: Any, headline: Mapping[str, float], cfg: Any, client: Any) -> list[str]:
    """Set ``<stage>.<key>`` tags on the registered backbone version(s) this stage evaluated (found by the
    ``slotcon.backbone_md5`` / ``slotcon.checkpoint_md5`` tags export sets), so the registry shows each candidate's
    figures and ``pipelines.registry promote`` can compare it with the champion; returns their versions."""
    if not headline:
        return []
    if getattr(args, "backbone", None) and Path(args.backbone).is_file():
        key, path = "slotcon.backbone_md5", Path(args.backbone)
    elif getattr(args, "checkpoint", None) and Path(args.checkpoint).is_file():
        key, path = "slotcon.checkpoint_md5", Path(args.checkpoint)
    else:
        return []
    md5 = file_md5(path)
    versions = client.search_model_versions(f"name = '{cfg.registered_model}' and tags.`{key}` = '{md5}'")
    for v in versions:
        for k, value in headline.items():
            client.set_model_version_tag(cfg.registered_model, v.version, f"{stage}.{k}", f"{value:.6g}")
    return [v.version for v in versions]
