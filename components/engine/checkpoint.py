"""Training checkpoints: atomic writes, finding the latest one, fingerprints of a run, per-rank RNG states.

Layout: ``<ckpt_dir>/<fingerprint>/step_<step:09d>.pt`` (see :func:`fingerprint`); every file is written with
:func:`components.io.save_torch_atomic` (temp file, fsync, rename), so a crash mid-save leaves the previous
checkpoint intact; only the newest ``keep`` files are kept.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from components import codegraph
from components.backbone import clean_keys
from components.config import resume_safe_keys
from components.errors import UserError
from components.io import PickledObjectsError, load_torch_plain, save_torch_atomic, torch_file_damage

#: 2: only tensors and plain values (RNG states as tensors and lists), read with ``weights_only=True``
FORMAT_VERSION = 2
_STEP_RE = re.compile(r"^step_(\d{9})\.pt$")

# Params that do not change what a step computes (marked ``resume_safe`` in the schema of components.config): they
# may differ between a checkpoint and the resuming run. The world size is in the extras.
RESUME_FREE_KEYS = resume_safe_keys()


def fingerprint(params: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """``(short hash, dict)`` of the run-defining params (all but :data:`RESUME_FREE_KEYS`) plus ``extra``.

    ``extra`` carries resolved facts that also define the run: world size, samples per epoch, a hash of the shard
    index (different data -> different run). The hash covers every param that changes what the run computes (model,
    optimisation, schedule length ``epochs``, seed, data identity, world size), not knobs that don't change the numbers
    (workers, logging/checkpoint cadence, compile); the engine adds the :func:`code_digest` of the method's code.
    ``epochs`` is in it because the cosine lr/EMA schedules span the
    whole run: ``dvc exp run -S pretrain.epochs=N`` must give the same model as a fresh N-epoch run, never a longer
    run's checkpoint with its schedule bent. So the same params resume from the newest checkpoint of that fingerprint
    (``torchrun --max-restarts`` and a re-run of ``dvc repro`` after a crash both land here); changed params restart
    cleanly in a fresh sub-folder, the old run's checkpoints untouched (switching back resumes it).
    """
    fp = {k: v for k, v in sorted(params.items()) if k not in RESUME_FREE_KEYS}
    fp.update({f"_{k}": v for k, v in sorted((extra or {}).items())})
    fp["_format"] = FORMAT_VERSION  # checkpoints of an older file format sit in another folder: a fresh run, no refusal
    text = json.dumps(fp, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12], fp


def code_digest(module: str, root: str | os.PathLike | None = None) -> str:
    """A hash of the project code a run executes: every file in the import closure of ``module`` (the method's
    module; the engine's for a method defined outside the project, e.g. in a test). It goes into the fingerprint, so
    after a code change (when DVC re-runs the stage) training starts fresh instead of resuming, or finding finished,
    the old code's run; a crash re-run on the same code still resumes."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    modules, _ = codegraph.graph(root)
    names = codegraph.closure(module if module in modules else "components.engine.loop", root)
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode() + b"\0" + modules[name].read_bytes() + b"\0")
    return h.hexdigest()[:16]


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"step_{step:09d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path), ...]`` sorted by step; temp files of interrupted saves are ignored."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


class UnsafeCheckpointError(UserError):
    """A checkpoint that holds pickled Python objects: refused, never loaded with the full unpickler."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or ``last.pt``) with torch's restricted unpickler
    (``weights_only=True``: no code in the file runs). One-line UserError naming the file if it is not one;
    :class:`UnsafeCheckpointError` if it holds pickled objects (an older format or a crafted file)."""
    path = Path(path)
    damage = torch_file_damage(path) if path.is_file() else None
    if damage:
        raise UserError(f"{path}: not a readable checkpoint ({damage}); delete it to start over")
    try:
        state = load_torch_plain(path, map_location)
    except PickledObjectsError as exc:
        raise UnsafeCheckpointError(f"{path}: {exc}; delete it and re-run the stage that writes it (a checkpoint "
                                    "of an older version cannot be resumed or read)") from None
    except Exception as exc:  # truncated / not a torch file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first}); delete it to start over")
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path}: not a SlotCon checkpoint (no 'model' entry); point to a pretrain checkpoint")
    return state


def find_latest(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint in ``run_dir`` as ``(path, state)``, or None.

    A file that fails to load or whose bytes fail their CRC-32 (cannot happen with atomic saves, but a disk can still
    lie) is skipped in favour of the previous one, with a warning.
    A file with pickled objects is refused (:class:`UnsafeCheckpointError`), not skipped: it was not written by this
    version of the engine, so the folder is not what it claims to be.
    """
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except UserError as exc:
            warnings.warn(f"skipping unreadable checkpoint: {exc}", stacklevel=2)
    return None


def save_checkpoint(state: Mapping[str, Any], run_dir: str | os.PathLike, step: int, keep: int = 2) -> Path:
    """Atomically write ``state`` as ``run_dir/step_<step>.pt`` and delete all but the newest ``keep`` files.

    A checkpoint holds what an exact resume needs: model state (student, teacher and the group-loss center, which is
    a buffer of the model), optimiser state, the global step, the epoch and the number of batches consumed in it (the
    loader is rebuilt for that epoch with the same seed and skips them), per-rank RNG states (:func:`rng_state`), the
    per-epoch running loss sums, and the config."""
    path = checkpoint_path(run_dir, step)
    save_torch_atomic(dict(state, format=FORMAT_VERSION), path)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        try:
            old.unlink()
        except FileNotFoundError:
            pass
    return path


def other_runs(ckpt_dir: str | os.PathLike, current: str) -> list[str]:
    """Fingerprints of other configurations that have checkpoints under ``ckpt_dir`` (for the restart message)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and p.name != current and list_checkpoints(p))


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """``"base_lr: 1.0 -> 0.5, seed: 0 -> 1"`` for the restart message."""
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(diffs) if diffs else "nothing"


# --------------------------------------------------------------------------------------------------------------------
# RNG states (per rank)
# --------------------------------------------------------------------------------------------------------------------
def _as_list(generators) -> list[torch.Generator]:
    if generators is None:
        return []
    return [generators] if isinstance(generators, torch.Generator) else list(generators)


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def _set_python_state(saved: Sequence[Any]) -> None:
    version, internal, gauss = saved
    random.setstate((int(version), tuple(int(v) for v in torch.as_tensor(internal).tolist()), gauss))


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_state(saved: Mapping[str, Any]) -> None:
    keys = torch.as_tensor(saved["keys"]).numpy().astype(np.uint32)
    np.random.set_state((saved["name"], keys, int(saved["pos"]), int(saved["has_gauss"]), float(saved["gauss"])))


def rng_state(generators: torch.Generator | Sequence[torch.Generator] | None = None) -> dict[str, Any]:
    """This rank's RNG states: torch CPU, CUDA (current device), Python's and NumPy's global generators, and the
    given generators (e.g. the augmentation generator); only tensors, numbers, strings and lists (Python's state as
    ``[version, int64 tensor, gauss]``, NumPy's as a dict with its keys as an int64 tensor)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_state(), "numpy": _numpy_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    gens = _as_list(generators)
    if gens:
        state["generators"] = [g.get_state() for g in gens]
        state["generator"] = state["generators"][0]  # (format 1 readers)
    return state


def set_rng_state(state: Mapping[str, Any], generators: torch.Generator | Sequence[torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        _set_python_state(state["python"])
    if "numpy" in state:
        _set_numpy_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    saved = state.get("generators") or ([state["generator"]] if "generator" in state else [])
    for g, s in zip(_as_list(generators), saved):
        g.set_state(s)


def remove_stale_temporaries(run_dir: str | os.PathLike) -> int:
    """Delete the temp files of checkpoint writes a crash interrupted (``.step_*.pt.*.tmp``); returns how many.

    Only the run's own folder is cleaned, by rank 0 before training, when no write of this run can be in flight.
    """
    d = Path(run_dir)
    if not d.is_dir():
        return 0
    n = 0
    for p in d.iterdir():
        if p.name.startswith(".step_") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n


# --------------------------------------------------------------------------------------------------------------------
# model state dicts
# --------------------------------------------------------------------------------------------------------------------
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers (so state_dict keys carry no ``module.`` prefix)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` prefixes anywhere in the keys (DDP, torch.compile)."""
    return clean_keys(sd)

