"""Two views of every image, for every pretraining method: the loader side (crop boxes and augmentation draws made
per sample in the CPU workers, :func:`build_loader`) and the pixel side (decode + augment whole batches,
:func:`make_views`: on the GPU after the loader, on a CPU inside the loader workers). The boxes are in original-image
pixels, so a method that needs the views' geometry (SlotCon's overlap coordinates, SIM's relative positions) reads it
from the batch (``boxes``, ``flips``, ``coords``).
"""
from __future__ import annotations

import hashlib
import io
from typing import Any

import torch
from PIL import Image

from components.data.loading.decode import decode_batch
from components.data.loading.loader import make_loader
from components.errors import UserError
from components.pretrain.augment import TwoViewAugment
from components.pretrain.crops import collate_crop_params, sample_two_crops


def sample_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of parts (different tuples -> independent streams)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def image_size(sample: dict) -> tuple[int, int]:
    """(height, width) of a sample: from the decoded tensor, else the COCO record, else the JPEG header."""
    img = sample["image"]
    if isinstance(img, torch.Tensor) and img.ndim == 3:
        return int(img.shape[-2]), int(img.shape[-1])
    rec = (sample.get("meta") or {}).get("image") or {}
    if rec.get("height") and rec.get("width"):
        return int(rec["height"]), int(rec["width"])
    with Image.open(io.BytesIO(bytes(img))) as im:  # reads the header only
        return im.height, im.width


class DrawCrops:
    """``map_fn`` for the loader: adds ``sample["crops"] = sample_two_crops(h, w, generator)`` and, from the same
    generator, ``sample["crops"]["draws"]``: the (2, NUM_DRAWS) uniforms of its two views' colour, blur and solarize
    decisions (:meth:`TwoViewAugment.from_uniforms`).

    The generator is seeded from ``(seed, epoch, rank, worker id, key, n-th time this worker sees the key)``: the
    resampled loader may repeat an image within an epoch, and a repeat gets new crops, while a restarted epoch (resume)
    re-draws exactly the same ones.
    """

    def __init__(self, seed: int, epoch: int, rank: int, scale: tuple[float, float] = (0.08, 1.0),
                 min_overlap: float = 0.01):
        self.seed, self.epoch, self.rank, self.scale = seed, epoch, rank, tuple(scale)
        self.min_overlap = min_overlap  # 0: two independent crops (image-level methods such as MoCo)
        self._seen: dict[str, int] = {}

    def __call__(self, sample: dict) -> dict:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        key = sample["key"]
        n = self._seen[key] = self._seen.get(key, -1) + 1
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, self.rank, worker, key, n))
        h, w = image_size(sample)
        sample["crops"] = sample_two_crops(h, w, gen, scale=self.scale, min_overlap=self.min_overlap)
        sample["crops"]["draws"] = torch.rand(2, TwoViewAugment.NUM_DRAWS, generator=gen)
        return sample


def collate_pairs(samples: list[dict]) -> dict[str, Any]:
    """Worker-side collate: images stay a list (sizes differ; JPEG bytes become uint8 tensors for nvJPEG), crop
    parameters are stacked: boxes (B, 2, 4), flips (B, 2), coords (B, 2, 4), fallback (B,), draws (B, 2, 13)."""
    images = []
    for s in samples:
        img = s["image"]
        if not isinstance(img, torch.Tensor):
            img = torch.frombuffer(bytearray(img), dtype=torch.uint8)
        images.append(img)
    batch: dict[str, Any] = {"images": images, "keys": [s["key"] for s in samples], "urls": [s["url"] for s in samples]}
    batch.update(collate_crop_params([s["crops"] for s in samples]))
    return batch


def build_loader(urls, *, rank_batch: int, samples_per_epoch: int, seed: int, epoch: int, rank: int,
                 world_size: int, num_workers: int, decode: str, crop_scale: tuple[float, float] = (0.08, 1.0),
                 min_overlap: float = 0.01, pin_memory: bool = False, expected_counts=None, map_fn=None,
                 augment: TwoViewAugment | None = None):
    """This rank's loader for ``epoch``: resampled, ``samples_per_epoch // world_size // rank_batch`` batches of
    ``rank_batch`` two-crop samples (see below). ``min_overlap``: the second crop must cover at least
    this share of its area inside the first (SlotCon's 1 %); 0 draws the two crops independently. ``expected_counts``
    (``{url: samples}``) makes it count lost samples exactly. ``map_fn``: a :class:`DrawCrops` (subclass) that draws
    more per sample (SIM: the block mask); default ``DrawCrops(seed, epoch, rank, crop_scale, min_overlap)``.

    The loader is resampled, so every rank gets the same number of batches; its workers read shards and only draw each
    sample's two crop boxes and flips (:class:`DrawCrops`, seeded from ``(seed, epoch, rank, worker, key,
    occurrence)``, never from DataLoader worker RNG, so a restarted epoch draws the same crops). ``decode="bytes"``
    (CUDA) passes the JPEG bytes through untouched; ``"rgb"`` (CPU) decodes in the workers. ``augment`` (a CPU
    :class:`TwoViewAugment`, for ``"rgb"``): the workers also make the views (:class:`AugmentInWorkers`), one batch
    per worker process at a time, and each batch arrives with ``batch["views"]``.
    """
    if augment is not None and decode != "rgb":
        raise ValueError("build_loader: augment in the workers needs decode='rgb' (CPU tensors)")
    return make_loader(
        list(urls), batch_size=rank_batch, decode=decode,
        map_fn=map_fn or DrawCrops(seed, epoch, rank, crop_scale, min_overlap),
        collate_fn=collate_pairs if augment is None else AugmentInWorkers(augment), shuffle=True,
        resampled=True, samples_per_epoch=samples_per_epoch,
        num_workers=num_workers, seed=seed, epoch=epoch, rank=rank, world_size=world_size, drop_last=True,
        pin_memory=pin_memory, expected_counts=expected_counts,
    )


class AugmentInWorkers:
    """Worker-side collate for CPU training: :func:`collate_pairs`, then :func:`make_views` on the CPU, so every
    loader worker decodes *and* augments its own batches (in parallel, one intra-op thread each, as the authors'
    per-image transforms run) and the training process only trains. The batch keeps its keys, urls and crop
    parameters (SIM's ``mask``), not the decoded images, and gains ``views``."""

    def __init__(self, augment: TwoViewAugment):
        self.augment = augment

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        batch = collate_pairs(samples)
        views = make_views(batch, self.augment, None, torch.device("cpu"))
        del batch["images"]
        batch["views"] = views
        return batch


def batch_views(batch: dict, augment: torch.nn.Module, device: torch.device, generator=None) -> dict:
    """The batch's views on ``device``: made by the loader workers (``batch["views"]``, :class:`AugmentInWorkers`) or
    here (:func:`make_views`). The same sample gets the same views either way (its draws travel with it)."""
    views = batch.get("views")
    if views is None:
        return make_views(batch, augment, generator, device)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in views.items()}


def make_views(batch: dict, augment: torch.nn.Module, generator: torch.Generator | None, device: torch.device,
               device_decode=None) -> dict:
    """Loader batch -> ``{"view1", "view2", "coords1", "coords2", "flip1", "flip2"}`` on ``device`` (plus the crop
    ``boxes`` (B, 2, 4) in original pixels, for methods that need the views' geometry, and ``dropped``: ``[(url, key,
    why)]`` of images no decoder accepted).

    An image that fails to decode is dropped with its crop parameters (boxes, flips, coords stay aligned with the
    images that remain), so this rank's batch has B' < B views; the losses take unequal batches over ranks.
    ``device_decode``: the device's batch decoder (default nvJPEG on CUDA; tests pass a CPU stand-in).

    On the device the JPEGs are batch-decoded (nvJPEG: :func:`components.data.loading.decode.decode_batch`), then
    ``augment`` (:class:`components.pretrain.augment.TwoViewAugment`) crops/resizes, colour-jitters, blurs and
    solarizes the whole batch with each sample's own draws (``batch["draws"]``, made with its crops; ``generator``
    only serves batches without them).
    """
    decoded = decode_batch(batch["images"], device, device_decode=device_decode)
    crops = {k: batch[k] for k in ("boxes", "flips", "coords", "draws") if k in batch}
    keys, urls = batch.get("keys") or [None] * len(batch["images"]), batch.get("urls") or [None] * len(batch["images"])
    dropped = [(urls[i], keys[i], why) for i, why in decoded.failed]
    if dropped:
        if not decoded.kept:
            named = "; ".join(f"{u} {k}: {w}" for u, k, w in dropped[:3])
            raise UserError(f"every image of a batch failed to decode ({named}); check the shards with "
                            "`slotcon shard --verify`")
        keep = torch.tensor(decoded.kept)
        crops = {k: v[keep] for k, v in crops.items()}
    # draws and flips stay on the CPU: the branch plan (which samples take which step) is made there
    crops = {k: v if k in ("draws", "flips") else v.to(device, non_blocking=True) for k, v in crops.items()}
    draws = crops.pop("draws", None)
    views = augment(decoded.images, crops if draws is None else {**crops, "draws": draws}, generator=generator)
    views["boxes"] = crops["boxes"]
    views["dropped"] = dropped
    return views
