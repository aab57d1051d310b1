"""Semantic-segmentation sources: samples ``{"key", "image": uint8 (3, H, W) RGB, "label": uint8 (H, W)}`` with
labels already contiguous class indices (255 = ignore), from a dataset folder (:func:`open_folder`, layouts in
:mod:`components.data.segmentation.layouts`), the shards' ``seg.png`` members (:func:`open_shards`), or memory;
:func:`open_source` picks the folder or the shards.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from components.data.loading.ledger import SplitLoss
from components.data.loading.loader import iterate_samples, make_loader
from components.data.prepare.manifest import read_manifest
from components.data.segmentation.layouts import find_split, semantic_lut
from components.data.shards.index import (INDEX_NAME, expected_counts, is_url, join_root, read_index, read_root_file,
                                          split_urls)
from components.errors import UserError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------------------
def decode_image(data: bytes | Path) -> torch.Tensor:
    """JPEG/PNG -> uint8 ``(3, H, W)`` RGB (grayscale and palette images are converted)."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_label(data: bytes | Path, where: str = "") -> np.ndarray:
    """Class-index PNG -> uint8 ``(H, W)`` raw values (palette PNGs give their indices, as VOC stores classes)."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        if im.mode in ("RGB", "RGBA"):
            raise UserError(
                f"{where or 'label'}: label PNG is colour-coded ({im.mode}); need one class index per pixel "
                "(palette or grayscale PNG, e.g. VOC SegmentationClass or Cityscapes *_labelTrainIds.png)"
            )
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise UserError(f"{where or 'label'}: label map has shape {arr.shape}; need (H, W) class indices")
    if arr.dtype != np.uint8:
        if arr.max(initial=0) > 255:
            raise UserError(f"{where or 'label'}: label values up to {arr.max()} do not fit uint8 class ids")
        arr = arr.astype(np.uint8)
    return arr


# ---------------------------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------------------------
class _ListedSource:
    """What the sources holding their samples as an ``items`` list of ``(key, image, label)`` share."""

    items: list
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.items)

    def keys(self) -> list[str]:
        return [k for k, _, _ in self.items]


@dataclass
class FolderSource(_ListedSource):
    """A split of a dataset on disk: ``items`` are ``(key, image path, label path)``, checked to exist."""

    kind: str
    root: Path
    split: str  # "train" | "val"
    items: list[tuple[str, Path, Path]]
    class_names: list[str]
    lut: np.ndarray  # (256,) uint8 raw label -> class or 255
    skipped: int = field(default=0)  # unreadable samples met so far (skipped and counted, never silently lost)
    with_labels: bool = True  # False: an unlabelled view; label files are never opened

    def subset(self, keys, *, labels: bool = True) -> "FolderSource":
        """The samples whose key is in ``keys`` (in this source's order); ``labels=False`` drops the label paths, so
        nothing downstream can open them."""
        keep = set(keys)
        items = [(k, img, lbl if labels else None) for k, img, lbl in self.items if k in keep]
        return FolderSource(self.kind, self.root, self.split, items, self.class_names, self.lut, 0, labels)

    def read(self, i: int) -> dict:
        """Sample ``i`` as ``{"key", "image": uint8 (3,H,W), "label": uint8 (H,W)}`` (no ``label`` when unlabelled)."""
        key, img_path, lbl_path = self.items[i]
        image = decode_image(img_path)
        if not self.with_labels:
            return {"key": key, "image": image}
        label = self.lut[decode_label(lbl_path, str(lbl_path))]
        if tuple(image.shape[1:]) != label.shape:
            raise UserError(
                f"{lbl_path}: label map {label.shape[1]}x{label.shape[0]} differs from its image "
                f"{image.shape[2]}x{image.shape[1]} ({img_path.name}); labels must be pixel-aligned with the images"
            )
        return {"key": key, "image": image, "label": torch.from_numpy(label)}

    def _read_or_none(self, i: int) -> dict | None:
        try:
            return self.read(i)
        except UserError:
            raise
        except Exception as exc:  # truncated / corrupt file: skip it, count it, say which
            self.skipped += 1
            log.warning("skipping unreadable sample %s (%s): %s", self.items[i][0], self.items[i][1], exc)
            return None

    def iterate(self) -> Iterator[dict]:
        """Every sample in a fixed order (evaluation)."""
        for i in range(len(self.items)):
            s = self._read_or_none(i)
            if s is not None:
                yield s

    def epoch_batches(
        self, epoch: int, *, batch_size: int, map_fn: Callable[[dict], dict], collate_fn: Callable, seed: int,
        num_workers: int = 0, rank: int = 0, world_size: int = 1,
    ) -> Iterator:
        """One shuffled pass (see :func:`indexed_epoch_batches`)."""
        return indexed_epoch_batches(self, epoch, batch_size=batch_size, map_fn=map_fn, collate_fn=collate_fn,
                                     seed=seed, num_workers=num_workers, rank=rank, world_size=world_size)


def indexed_epoch_batches(
    src, epoch: int, *, batch_size: int, map_fn: Callable[[dict], dict], collate_fn: Callable, seed: int,
    num_workers: int = 0, rank: int = 0, world_size: int = 1,
) -> Iterator:
    """One shuffled pass over an indexable source (``len`` + ``_read_or_none(i)``): epoch ``epoch``'s permutation
    is drawn from ``(seed, epoch)`` (reproducible, resumable).

    Under DDP every rank takes every ``world_size``-th image of the same permutation, cut to equal length, so ranks
    yield equally many batches (``drop_last`` when the rank holds a full batch)."""
    ds = _MappedFolder(src, map_fn)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(src), generator=g).tolist()
    per_rank = len(order) // world_size
    order = order[rank::world_size][:per_rank]
    dl = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, sampler=order, num_workers=num_workers, drop_last=len(order) >= batch_size,
        collate_fn=lambda b: collate_fn([s for s in b if s is not None]),
    )
    yield from dl


class _MappedFolder(torch.utils.data.Dataset):
    def __init__(self, src, map_fn: Callable[[dict], dict]):
        self.src, self.map_fn = src, map_fn

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int):
        s = self.src._read_or_none(i)
        return None if s is None else self.map_fn(s)


class _ShardMap:
    """Loader ``map_fn``: loader sample -> ``{"key","image","label"}`` with the class LUT applied, then ``inner``.
    With ``keep``, samples of other keys are dropped (None); with ``labels=False`` no ``label`` is produced (the
    loader then runs with ``with_seg=False``: the maps are never decoded). A labelled sample without its map (a tar
    cut inside the sample, or a map ``prepare`` dropped) becomes ``{"lost": "no_seg", "key", "url"}``, which
    :class:`_CollateKept` leaves out of the batch and hands on to be counted."""

    def __init__(self, lut: np.ndarray, inner: Callable[[dict], dict] | None, keep: frozenset | None = None,
                 labels: bool = True):
        self.lut = torch.from_numpy(lut)
        self.inner, self.keep, self.labels = inner, keep, labels

    def __call__(self, sample: dict) -> dict | None:
        if self.keep is not None and sample["key"] not in self.keep:
            return None
        if not self.labels:
            out = {"key": sample["key"], "image": sample["image"]}
            return self.inner(out) if self.inner else out
        if sample.get("seg") is None:
            return {"lost": "no_seg", "key": sample.get("key"), "url": sample.get("url")}
        out = {"key": sample["key"], "image": sample["image"], "label": self.lut[sample["seg"].long()]}
        return self.inner(out) if self.inner else out


class _CollateKept:
    """Loader ``collate_fn``: ``(collate_fn(usable samples) or None when none is, [(url, key) of the lost ones])``."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, samples: list) -> tuple:
        marked = [isinstance(s, dict) and "lost" in s for s in samples]
        kept = [s for s, m in zip(samples, marked) if not m]
        lost = [(s["url"], s["key"]) for s, m in zip(samples, marked) if m]
        return (self.collate_fn(kept) if kept else None), lost


#: the most encoded bytes (JPEG + PNG) of labelled shard samples held in memory (:meth:`ShardSource.subset`)
MAX_LABELED_BYTES = 2 * 2**30


@dataclass
class MemorySource(_ListedSource):
    """Labelled samples held as their encoded bytes (read once from the shards; decoded on each visit)."""

    kind: str
    items: list[tuple[str, bytes, bytes]]  # (key, JPEG bytes, seg.png bytes)
    class_names: list[str]
    lut: np.ndarray
    where: str = ""
    skipped: int = 0

    def read(self, i: int) -> dict:
        key, jpg, seg = self.items[i]
        label = self.lut[decode_label(seg, f"{self.where} {key}.seg.png")]
        return {"key": key, "image": decode_image(jpg), "label": torch.from_numpy(label)}

    def _read_or_none(self, i: int) -> dict | None:
        try:
            return self.read(i)
        except UserError:
            raise
        except Exception as exc:  # a corrupt member: skip it, count it, say which
            self.skipped += 1
            log.warning("skipping unreadable sample %s (%s): %s", self.items[i][0], self.where, exc)
            return None

    def epoch_batches(self, epoch: int, **kw) -> Iterator:
        return indexed_epoch_batches(self, epoch, **kw)


def _read_tar_members(url: str, wanted: set[str]) -> dict[str, dict[str, bytes]]:
    """``{key: {ext: bytes}}`` of the members of ``wanted`` keys in one shard; other members' data is skipped
    (seeked over in a local file), never decoded."""
    out: dict[str, dict[str, bytes]] = {}
    local = Path(url).is_file()
    if local:
        tf = tarfile.open(url, mode="r:")
    else:
        import fsspec  # lazy: fsspec (~0.1 s) only for remote shard URLs

        tf = tarfile.open(fileobj=fsspec.open(url, "rb").open(), mode="r|")
    with tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            if key in wanted and m.isfile():
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@dataclass
class ShardSource:
    """The scenes (or any sharded) split with ``seg.png`` members, read through ``components.data.loading.loader``."""

    shards_root: str | Path  # a folder or an fsspec URL
    split: str  # the split's name in index.json (e.g. "val2017")
    urls: list[str]
    class_names: list[str]
    lut: np.ndarray
    num_samples: int
    kind: str = "scenes"
    skipped: int = 0  # corrupt samples the loader skipped (and counted) so far
    keep: frozenset | None = None  # a subset: only these keys
    with_labels: bool = True  # False: the maps are never decoded (the unlabelled part of a semi-supervised split)
    loss: SplitLoss | None = None  # lost samples of the split, counted against index.json (shared by subsets)
    max_lost_fraction: float = 1.0  # stop (one line naming the shard) when more of the split is lost
    what: str = "segmentation"  # the stage named in that line

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.num_samples

    def samples(self) -> Iterator[dict]:
        """The loader's samples of the split in a fixed order (``meta`` kept; a labelled view yields only samples with
        their map). Every sample lost on the way is counted in :attr:`loss`; at the end of the pass the stage stops
        (one line naming the shard) when more than ``max_lost_fraction`` of the split is lost."""
        it = iterate_samples(self.urls, decode="rgb", with_seg=self.with_labels,
                             expected_counts=self.loss.expected if self.loss else None)
        for s in it:
            if self.with_labels and s.get("seg") is None:
                if self.loss is not None:
                    self.loss.drop(s["url"], s["key"], "no_seg")
                continue
            yield s
        self.skipped += it.stats["skipped"]
        self._account(it.errors, merge=False)

    def _account(self, records: list, *, merge: bool) -> None:
        if self.loss is not None:
            self.loss.add(records)
            self.loss.check(self.max_lost_fraction, self.what, merge=merge)

    def iterate(self) -> Iterator[dict]:
        """``{"key", "image", "label"}`` of :meth:`samples` (class LUT applied; a subset's other keys left out)."""
        mapped = map(_ShardMap(self.lut, None, self.keep, self.with_labels), self.samples())
        return (s for s in mapped if s is not None)

    def epoch_batches(
        self, epoch: int, *, batch_size: int, map_fn: Callable[[dict], dict], collate_fn: Callable, seed: int,
        num_workers: int = 0, rank: int = 0, world_size: int = 1,
    ) -> Iterator:
        """One pass with its own ``(seed, epoch)`` shuffle; under DDP resampled so ranks yield equally many batches.
        Lost samples are counted before each batch is handed on (all ranks merged under DDP) and the pass stops above
        ``max_lost_fraction``, as pretraining does."""
        resampled = world_size > 1
        loader = make_loader(
            self.urls, batch_size=batch_size, decode="rgb", with_seg=self.with_labels,
            map_fn=_ShardMap(self.lut, map_fn, self.keep, self.with_labels),
            collate_fn=_CollateKept(collate_fn), shuffle=True, num_workers=num_workers, seed=seed, epoch=epoch,
            rank=rank, world_size=world_size, resampled=resampled,
            samples_per_epoch=self.num_samples if resampled else None,
            drop_last=self.num_samples >= batch_size * world_size,
            expected_counts=self.loss.expected if self.loss else None,
        )
        seen = 0
        for batch, lost in loader:
            for url, key in lost:
                if self.loss is not None:
                    self.loss.drop(url, key, "no_seg")
            self._account(loader.errors[seen:], merge=world_size > 1)
            seen = len(loader.errors)
            if batch is not None:
                yield batch
        self.skipped += loader.stats["skipped"]
        self._account(loader.errors[seen:], merge=world_size > 1)

    def keys(self) -> list[str]:
        """Every sample key of the split, from its manifest (no shard is read)."""
        return [r["key"] for r in self._manifest()]

    def _manifest(self) -> list[dict]:
        path = join_root(self.shards_root, self.split, "manifest.parquet")
        data = read_root_file(path) if is_url(path) else (path if Path(path).is_file() else None)
        if data is None:
            raise UserError(f"{path}: missing; the labelled/unlabelled split needs the shard manifest (re-run shard)")
        rows, _ = read_manifest(pa.BufferReader(data) if isinstance(data, bytes) else data)
        return [r for r in rows if self.keep is None or r["key"] in self.keep]

    def subset(self, keys, *, labels: bool = True):
        """The samples of ``keys``. Unlabelled: a filtered stream whose maps are never decoded. Labelled: read once
        into memory (encoded bytes, only the wanted members of the shards that hold them; at most
        :data:`MAX_LABELED_BYTES`) -> a :class:`MemorySource`."""
        keep = frozenset(keys)
        if not labels:
            return dataclasses.replace(self, keep=keep, with_labels=False, num_samples=len(keep), skipped=0)
        rows = sorted((r for r in self._manifest() if r["key"] in keep), key=lambda r: r["key"])
        nbytes = sum(int(r["bytes"]) + int(r["seg_bytes"] or 0) for r in rows)
        if nbytes > MAX_LABELED_BYTES:
            raise UserError(f"{self.shards_root}: the {len(rows)} labelled images take {nbytes / 2**30:.1f} GiB; "
                            "give data_root (a dataset folder, read lazily) for large labelled sets, or fewer labels")
        found: dict[str, dict[str, bytes]] = {}
        for shard in sorted({r["shard"] for r in rows}):
            found.update(_read_tar_members(join_root(self.shards_root, self.split, shard), set(keep)))
        items = []
        for r in rows:
            m = found.get(r["key"], {})
            if "jpg" not in m or "seg.png" not in m:
                shard = join_root(self.shards_root, self.split, r["shard"])
                raise UserError(f"{shard}: labelled sample {r['key']!r} lacks "
                                f"its jpg/seg.png members (has {sorted(m)}); re-run `slotcon shard`")
            items.append((r["key"], m["jpg"], m["seg.png"]))
        return MemorySource(self.kind, items, self.class_names, self.lut, join_root(self.shards_root, self.split))


def open_shards(shards_root: str | Path, split: str = "val", *, max_lost_fraction: float = 1.0,
                what: str = "segmentation") -> ShardSource:
    """The ``train``/``val`` split of the shards (as named in ``index.json``), with its semantic classes; its lost
    samples are counted against ``index.json`` and ``what`` stops above ``max_lost_fraction`` of them."""
    root = shards_root if is_url(shards_root) else Path(shards_root)
    index = read_index(root)
    name = index.get(split, split) if split in ("train", "val") else split
    info = index.get("splits", {}).get(name)
    if info is None:
        raise UserError(f"{join_root(root, INDEX_NAME)}: no split {name!r} (have {sorted(index.get('splits', {}))}); "
                        "re-run shard")
    if not index.get("semantic_classes") or info.get("with_seg") == 0:
        raise UserError(
            f"{join_root(root, INDEX_NAME)}: the {name} shards (source {index.get('source')!r}) carry no semantic maps; "
            "set data_root to a labelled dataset folder (COCO-Stuff, VOC, Cityscapes, ADE20K) or use the scenes source"
        )
    names, lut = semantic_lut(index["semantic_classes"], f"{join_root(root, INDEX_NAME)} (semantic_classes)")
    return ShardSource(root, name, split_urls(root, name), names, lut, int(info.get("num_samples", 0)),
                       loss=SplitLoss(expected_counts(root, name), name), max_lost_fraction=max_lost_fraction,
                       what=what)


def open_folder(root: str | Path, kind: str = "auto", split: str = "val") -> FolderSource:
    """A ``train``/``val`` split of the dataset at ``root`` (kind detected when ``auto``). Cheap: no decoding."""
    found = find_split(root, kind, split)
    return FolderSource(found.kind, Path(root), split, found.items, found.class_names, found.lut)


def open_source(data_root: str, shards_root: str | Path | None, kind: str = "auto", split: str = "val", *,
                max_lost_fraction: float = 1.0, what: str = "segmentation"):
    """``data_root`` empty -> the shards' split (scenes, lost samples counted: :func:`open_shards`); else the dataset
    folder at ``data_root``."""
    if data_root:
        return open_folder(data_root, kind, split)
    if shards_root is None:
        raise UserError("segmentation: no data_root and no --shards; give one of them")
    if kind not in ("auto", "scenes"):
        raise UserError(f"params: dataset={kind!r} needs data_root (the dataset folder); empty means the shards")
    return open_shards(shards_root, split, max_lost_fraction=max_lost_fraction, what=what)
