"""Image-tree sources of ``prepare``: ``imagenet`` (ILSVRC-2012 layouts) and ``folder`` (any tree of images), walked
as a deterministic stream (nothing is listed up front, so 1.28M files cost no memory), with their keys, ids and labels.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

from components.data.prepare.images import IMAGE_EXTENSIONS
from components.errors import UserError

MAX_KEY_SLUG = 64  # key = slug (<= 64) + "-" + 12 hex: well inside one 100-byte tar name with ".seg.png"


# --------------------------------------------------------------------------------------------------------------------
# globs
# --------------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern:
    """A path glob -> regex: ``**`` any number of folders (also none), ``*``/``?`` within one name, ``[...]``."""
    out, i, n = ["^"], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : j]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + "$")


@dataclass(frozen=True)
class Selector:
    include: tuple[str, ...] = ("**",)
    exclude: tuple[str, ...] = ()

    def __call__(self, rel: str) -> bool:
        return any(glob_regex(p).match(rel) for p in self.include) and not any(
            glob_regex(p).match(rel) for p in self.exclude)


# --------------------------------------------------------------------------------------------------------------------
# the walk
# --------------------------------------------------------------------------------------------------------------------
def _skip(rel: str, reason: str, detail: str) -> dict[str, Any]:
    return {"rel": rel, "reason": reason, "detail": detail}


def _valid_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes became surrogates (os.fsdecode)
        return False
    return True


def walk_images(base: Path, top: str, select: Selector, counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Every file under ``base/top``, depth first in sorted order: image candidates and on-the-spot skips.

    An entry is ``{"rel" (POSIX path relative to ``base``), "size", "mtime_ns", "reason": None}``, or ``rel`` with a
    ``reason``/``detail`` for a file skipped on the spot. Symlinks are followed; a link back to a folder being walked
    is ``symlink_loop``, a second way into a folder already walked ``linked_dir_seen`` (its files would be
    duplicates), a dangling link ``broken_symlink``. Names starting with ``.`` are ``hidden`` and not entered; a file
    whose extension is not an image's (:data:`~components.data.prepare.images.IMAGE_EXTENSIONS`) is ``not_image``, one
    whose name is not valid UTF-8 ``bad_name``, fifos/devices ``not_regular``, others ``unreadable``. The ``select``
    globs (``data.include``/``exclude``) leave files out: ``counts["excluded"]`` counts them (not a skip).
    """
    start = base / top if top else base
    try:
        st = os.stat(start)
    except OSError as exc:
        raise UserError(f"{start}: cannot be read ({exc.strerror}); check data.root") from None
    visited = {(st.st_dev, st.st_ino)}
    # each frame: (folder path, its rel prefix, iterator over its sorted entries, its (dev, ino))
    stack = [(start, f"{top}/" if top else "", iter(_sorted_entries(start)), (st.st_dev, st.st_ino))]
    ancestors = [(st.st_dev, st.st_ino)]
    while stack:
        path, prefix, entries, _ = stack[-1]
        name = next(entries, None)
        if name is None:
            stack.pop()
            ancestors.pop()
            continue
        rel = prefix + name
        if not _valid_name(name):
            yield _skip(rel.encode("utf-8", "backslashreplace").decode(), "bad_name", "file name is not valid UTF-8")
            continue
        if name.startswith("."):
            yield _skip(rel, "hidden", "name starts with a dot")
            continue
        full = path / name
        try:
            st = os.stat(full)  # follows symlinks
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a link chain that never ends
                yield _skip(rel, "symlink_loop", "symlink chain loops")
            elif os.path.islink(full):
                yield _skip(rel, "broken_symlink", f"points to {os.readlink(full)!r}, which does not exist")
            else:
                yield _skip(rel, "unreadable", f"{type(exc).__name__}: {exc.strerror}")
            continue
        ident = (st.st_dev, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            if ident in ancestors:
                yield _skip(rel + "/", "symlink_loop", "links back to a folder that contains it")
            elif ident in visited:
                yield _skip(rel + "/", "linked_dir_seen", "a folder already walked under another path")
            else:
                visited.add(ident)
                try:
                    names = _sorted_entries(full)
                except OSError as exc:
                    yield _skip(rel + "/", "unreadable", f"folder: {exc.strerror}")
                    continue
                stack.append((full, rel + "/", iter(names), ident))
                ancestors.append(ident)
            continue
        if not select(rel):
            counts["excluded"] = counts.get("excluded", 0) + 1
            continue
        if not stat.S_ISREG(st.st_mode):
            yield _skip(rel, "not_regular", "not a regular file (fifo, socket or device)")
        elif os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            yield _skip(rel, "not_image", f"extension {os.path.splitext(name)[1] or '(none)'!r} is not an image's")
        else:
            yield {"rel": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "reason": None}


def _sorted_entries(path: Path) -> list[str]:
    # names only (a folder of 1300 files is a small list); sorted by code point so the order is the same everywhere
    with os.scandir(path) as it:
        return sorted(e.name for e in it)


# --------------------------------------------------------------------------------------------------------------------
# keys and ids
# --------------------------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:MAX_KEY_SLUG] or "img"


def path_key(rel: str) -> str:
    """A WebDataset key for a file of a folder tree: readable slug of its path + 12 hex of the path's hash. ASCII, no
    dots, unique per path (two paths share a key only if both their slugs and 48-bit hashes collide)."""
    stem = os.path.splitext(rel)[0]
    return f"{_slug(stem)}-{hashlib.blake2b(rel.encode(), digest_size=6).hexdigest()}"


def stem_key(rel: str) -> str:
    """ImageNet's keys: the file stem (``n01440764_10026``, ``ILSVRC2012_val_00000001``), made ASCII and dot-free."""
    return _slug(os.path.splitext(os.path.basename(rel))[0])


def path_id(rel: str) -> int:
    """A stable 63-bit image id from the relative path (int64-safe; no counter, so ids survive added files)."""
    return int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "big") >> 1


# --------------------------------------------------------------------------------------------------------------------
# the two sources
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class TreeSplit:
    """One split of a tree source: ``entries(counts)`` streams its files (see :func:`walk_images`), labelled."""

    name: str
    entries: Callable[[dict[str, int]], Iterator[dict[str, Any]]]
    key: Callable[[str], str]


@dataclass
class TreeSource:
    source: str
    root: Path  # data.root as given
    base: Path  # the folder that file names are relative to (root, or Kaggle's ILSVRC/Data/CLS-LOC under it)
    splits: list[TreeSplit]
    pretrain: list[str]
    val: str | None
    classes: list[dict[str, Any]] | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def folder_source(cfg) -> TreeSource:
    root = Path(cfg.root)
    if not root.is_dir():
        raise UserError(f"{root}: folder not found; set data.root to the folder holding your images")
    select = Selector(tuple(cfg.include), tuple(cfg.exclude))

    def entries(counts):
        for e in walk_images(root, "", select, counts):
            yield {**e, "label": None, "label_name": None}

    return TreeSource("folder", root, root, [TreeSplit("train", entries, path_key)], ["train"], None)


def _imagenet_base(root: Path) -> Path:
    for base in (root, root / "ILSVRC" / "Data" / "CLS-LOC"):
        if (base / "train").is_dir():
            return base
    raise UserError(f"{root}: no train/ folder (nor ILSVRC/Data/CLS-LOC/train/); expected ImageNet's train/<wnid>/"
                    "*.JPEG (ILSVRC2012_img_train.tar with each class tar unpacked into its wnid folder)")


def _find(names: tuple[str, ...], *folders: Path) -> Path | None:
    for d in folders:
        for n in names:
            if (d / n).is_file():
                return d / n
    return None


def _val_labels(root: Path, base: Path, val: Path) -> tuple[dict[str, str], str | None]:
    """``{file stem: wnid}`` for a flat val/ folder, from the files ImageNet's distributions ship."""
    sol = _find(("LOC_val_solution.csv",), root, base, val)
    if sol is not None:
        with open(sol, newline="") as f:
            rows = list(csv.reader(f))
        return {r[0]: r[1].split()[0] for r in rows[1:] if len(r) >= 2 and r[1].split()}, sol.name
    txt = _find(("imagenet_2012_validation_synset_labels.txt",), root, base, val)
    if txt is not None:
        wnids = txt.read_text().split()
        stems = sorted(os.path.splitext(n)[0] for n in os.listdir(val) if not n.startswith("."))
        return dict(zip(stems, wnids)), txt.name
    return {}, None


def imagenet_source(cfg) -> TreeSource:
    """ImageNet at ``data.root``: ``train/<wnid>/*.JPEG`` (class ids = sorted wnids, 0..999, as torchvision's
    ImageFolder) and ``val/`` in class folders too, or flat (``ILSVRC2012_val_*.JPEG``) with labels from
    ``LOC_val_solution.csv`` (Kaggle) or ``imagenet_2012_validation_synset_labels.txt`` (one wnid per line, in file
    order) when present. Kaggle's ``ILSVRC/Data/CLS-LOC/`` nesting is found by itself; ``LOC_synset_mapping.txt``
    gives class names. Labels are kept for later probes; pretraining never reads them."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise UserError(f"{root}: folder not found; set data.root to the ImageNet folder (holding train/ and val/)")
    base = _imagenet_base(root)
    wnids = sorted(d.name for d in os.scandir(base / "train") if d.is_dir() and not d.name.startswith("."))
    if not wnids:
        raise UserError(f"{base / 'train'}: no class folders; expected train/<wnid>/*.JPEG (one folder per class)")
    index = {w: i for i, w in enumerate(wnids)}
    mapping = _find(("LOC_synset_mapping.txt",), root, base)
    names: dict[str, str] = {}
    if mapping is not None:
        for line in mapping.read_text().splitlines():
            wnid, _, name = line.partition(" ")
            names[wnid] = name.strip()
    classes = [{"id": i, "wnid": w, "name": names.get(w, w)} for i, w in enumerate(wnids)]
    select = Selector(tuple(cfg.include), tuple(cfg.exclude))
    notes: dict[str, Any] = {}

    def train_entries(counts):
        for e in walk_images(base, "train", select, counts):
            parts = e["rel"].split("/")
            if e["reason"] is None and len(parts) < 3:
                e = _skip(e["rel"], "no_class", "a file directly in train/, outside every class folder")
            wnid = parts[1] if len(parts) >= 3 else None
            yield {**e, "label": index.get(wnid), "label_name": wnid}

    splits = [TreeSplit("train", train_entries, stem_key)]
    val = base / "val"
    if val.is_dir():
        flat = not any(d.is_dir() for d in os.scandir(val) if not d.name.startswith("."))
        labels, label_file = _val_labels(root, base, val) if flat else ({}, None)
        notes["val_layout"] = "flat" if flat else "class folders"
        notes["val_labels"] = label_file if flat else "class folders"

        def val_entries(counts):
            for e in walk_images(base, "val", select, counts):
                parts = e["rel"].split("/")
                wnid = parts[1] if len(parts) >= 3 else labels.get(os.path.splitext(parts[-1])[0])
                yield {**e, "label": index.get(wnid), "label_name": wnid}

        splits.append(TreeSplit("val", val_entries, stem_key))
    return TreeSource("imagenet", root, base, splits, ["train"], "val" if val.is_dir() else None, classes, notes)


def tree_source(cfg) -> TreeSource:
    """The :class:`TreeSource` of ``cfg.source`` (``imagenet`` | ``folder``); layout errors are one-line UserErrors."""
    return imagenet_source(cfg) if cfg.source == "imagenet" else folder_source(cfg)
