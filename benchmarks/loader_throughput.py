"""Data-only images/s of our pretraining input (shards -> loader workers -> two augmented views) against the authors'
way (one JPEG file per image, PIL + torchvision transforms of SlotCon's recipe in ``DataLoader`` workers), over the
same JPEGs with the same worker count, in one run (prints figures and the ratio, asserts nothing).

    .venv/bin/python benchmarks/loader_throughput.py [--quick] [--images 600] [--workers 2] [--batch 32]
                                                     [--size 224] [--repeat 3]

Ours is what ``pretrain`` runs on a CPU: :func:`components.pretrain.views.build_loader` (resampled shards, JPEGs
decoded in the workers, crop boxes and augmentation draws made there) with
:class:`components.pretrain.views.AugmentInWorkers`, so each worker also makes its batches' views
(:func:`components.pretrain.views.make_views`: batched crop + resize, colour jitter, grayscale, blur, solarize,
normalisation). A third line makes the views in the main process after the loader instead (the GPU layout, here on
the CPU, with the intra-op threads ``pretrain`` sets: the cores left after one per worker). The authors' way (written here from their recipe: two
random resized crops, bicubic, the second overlapping the first by 1 % of its area; flips; colour jitter p 0.8,
grayscale p 0.2, blur p 1.0 / 0.1, solarize p 0.2 on view 2; ToTensor + Normalize) does all of it per image in the
workers. Inputs: ``--images`` COCO-size JPEGs (640x480, ~135 KB), prepared and sharded once. Each side has an
untimed warm-up pass (page cache, worker start-up paths); then ``--repeat`` timed passes of each, in turn.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from components.config import DataConfig, ShardConfig  # noqa: E402
from components.constants import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from components.data.prepare.stage import run_prepare  # noqa: E402
from components.data.shards.stage import expected_counts, run_shard, split_urls  # noqa: E402
from components.pretrain.augment import TwoViewAugment  # noqa: E402
from components.pretrain.stage import cpu_threads  # noqa: E402
from components.pretrain.views import batch_views, build_loader  # noqa: E402
from shard_throughput import write_coco_size  # noqa: E402


# --------------------------------------------------------------------------------------------------------------------
# the authors' way, written from their recipe
# --------------------------------------------------------------------------------------------------------------------
def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Pixels shared by two (top, left, height, width) boxes."""
    dy = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    dx = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(dx, 0) * max(dy, 0)


class PilBlur:
    """PIL Gaussian blur with a radius drawn in [0.1, 2], applied with probability ``p``."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        if random.random() < self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return img


class PlainTwoViews:
    """One PIL image -> (view1, view2, coords): SlotCon's recipe, image by image."""

    def __init__(self, size: int, min_scale: float = 0.08):
        self.size, self.scale, self.ratio = size, (min_scale, 1.0), (3 / 4, 4 / 3)
        jitter = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
        norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.view1 = T.Compose([*jitter, PilBlur(1.0), *norm])
        self.view2 = T.Compose([*jitter, PilBlur(0.1), T.RandomSolarize(128, p=0.2), *norm])

    def _second_box(self, img, first):
        width, height = img.size
        for _ in range(10):
            area = random.uniform(*self.scale) * width * height
            aspect = math.exp(random.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                box = (random.randint(0, height - h), random.randint(0, width - w), h, w)
                if _overlap(box, first) >= 0.01 * area:
                    return box
        return T.RandomResizedCrop.get_params(img, self.scale, self.ratio)

    def __call__(self, img):
        first = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        boxes = [first, self._second_box(img, first)]
        crops = [TF.resized_crop(img, *b, [self.size, self.size], TF.InterpolationMode.BICUBIC) for b in boxes]
        crops = [TF.hflip(c) if torch.rand(1).item() < 0.5 else c for c in crops]
        coords = torch.tensor([[b[1], b[0], b[1] + b[3], b[0] + b[2]] for b in boxes], dtype=torch.float32)
        return self.view1(crops[0]), self.view2(crops[1]), coords


class JpegFiles(torch.utils.data.Dataset):
    """One JPEG file per item, opened with PIL (the authors' ``ImageFolder``)."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def plain_pass(paths: list[str], workers: int, batch: int, size: int, epoch: int) -> int:
    loader = torch.utils.data.DataLoader(JpegFiles(paths, PlainTwoViews(size)), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(epoch))
    n = 0
    for view1, view2, _ in loader:
        n += view1.shape[0]
    return n


# --------------------------------------------------------------------------------------------------------------------
# ours, as pretraining runs it on a CPU
# --------------------------------------------------------------------------------------------------------------------
def ours_pass(urls: list[str], expected: dict[str, int], n: int, workers: int, batch: int, size: int,
              epoch: int, in_workers: bool = True) -> int:
    """``in_workers``: the views are made in the loader workers (what ``pretrain`` does on a CPU); else in this
    process after the loader (what it does on a GPU, here on the CPU: the figure it would have without workers)."""
    augment, cpu = TwoViewAugment(image_size=size), torch.device("cpu")
    loader = build_loader(urls, rank_batch=batch, samples_per_epoch=n, seed=0, epoch=epoch, rank=0, world_size=1,
                          num_workers=workers, decode="rgb", expected_counts=expected,
                          augment=augment if in_workers else None)
    done = 0
    for b in loader:
        views = batch_views(b, augment, cpu)
        done += views["view1"].shape[0]
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224, help="view side")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes of each side (medians)")
    ap.add_argument("--dir", default=None, help="work folder (default: a temp dir, removed at the end)")
    args = ap.parse_args()
    if args.quick:
        args.images, args.batch, args.size, args.repeat = 64, 16, 96, 1
    tmp = tempfile.TemporaryDirectory(prefix="loader_bench_") if args.dir is None else None
    work = Path(args.dir or tmp.name)
    root = work / "jpegs"
    files, nbytes = write_coco_size(root, args.images)
    run_prepare(DataConfig(source="folder", root=str(root), workers=args.workers), "unused", work / "raw",
                progress=False)
    run_shard(ShardConfig(max_count=max(1, args.images // 8), workers=args.workers, verify=False), work / "raw",
              work / "shards", progress=False)
    urls, expected = split_urls(work / "shards", "train"), expected_counts(work / "shards", "train")
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    torch.set_num_threads(cpu_threads(torch.get_num_threads(), args.workers))  # what pretrain sets on a CPU
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s) "
          f"in the main process; {files} JPEGs ({nbytes / files / 1e3:.0f} KB avg) in {len(urls)} shards; "
          f"{args.workers} workers, batch {args.batch}, views {args.size} px")
    plain_pass(paths, args.workers, args.batch, args.size, 0)  # warm-up passes
    ours_pass(urls, expected, files, args.workers, args.batch, args.size, 0)
    plain_s, ours_s, main_s = [], [], []
    for epoch in range(1, args.repeat + 1):
        for rates, run in ((plain_s, lambda e: plain_pass(paths, args.workers, args.batch, args.size, e)),
                           (ours_s, lambda e: ours_pass(urls, expected, files, args.workers, args.batch, args.size,
                                                        e)),
                           (main_s, lambda e: ours_pass(urls, expected, files, args.workers, args.batch, args.size,
                                                        e, in_workers=False))):
            t = time.perf_counter()
            k = run(epoch)
            rates.append(k / (time.perf_counter() - t))
    print(f"{'who':>48} | {'img/s (two views each)':>22}")
    print(f"{'authors: files + PIL/torchvision workers':>48} | {np.median(plain_s):>22.1f}")
    print(f"{'ours: shards + batched views in the workers':>48} | {np.median(ours_s):>22.1f}")
    print(f"{'ours, views in the main process (GPU layout)':>48} | {np.median(main_s):>22.1f}")
    for name, rates in (("ours/authors", ours_s), ("ours-main-process/authors", main_s)):
        ratios = [o / p for o, p in zip(rates, plain_s)]
        print(f"ratio {name} {np.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f} over "
              f"{len(ratios)} pairs)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
