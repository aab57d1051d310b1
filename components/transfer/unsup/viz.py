"""Stage ``viz``: pictures of what the model's clusters found (PNGs under ``plots/slots/``, DVC plots + MLflow artifacts).

Images are composed pixel by pixel with numpy/PIL (no matplotlib): sizes are exact, so tests can check them.
"""
from __future__ import annotations

import colorsys
import io
import logging
import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from components.data.loading.loader import iterate_samples
from components.data.loading.ledger import SplitLoss, loss_details
from components.data.shards.index import expected_counts, read_index, shards_root, split_urls
from components.errors import UserError
from components.io import write_bytes_atomic
from components.pretrain.registry import open_pretrained
from components.stage import Arg, Stage
from components.tracking import Tracker
from components.transfer.unsup.clusters import ClusterHead
from components.transfer.unsup.stage import batched, image_batches, normalize

log = logging.getLogger(__name__)

PAD = 4  # pixels between panels
LABEL_W = 56  # left margin of a concept row (prototype id, usage, colour swatch)
CELL = 128  # side of one segment crop in the concept figure, whatever the resolution
MIN_SEGMENT_FRAC = 0.01


def palette(k: int) -> np.ndarray:
    """``(k, 3)`` uint8 fixed colours: hues spread by the golden ratio, alternating brightness (neighbours differ)."""
    cols = []
    for i in range(k):
        h = (i * 0.618033988749895) % 1.0
        s = 0.85 if i % 2 == 0 else 0.55
        v = 0.95 if (i // 2) % 2 == 0 else 0.75
        cols.append([round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v)])
    return np.asarray(cols, dtype=np.uint8)


def _hwc(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).cpu().numpy().astype(np.uint8)


def _text(canvas: np.ndarray, xy: tuple[int, int], text: str, color=(0, 0, 0)) -> np.ndarray:
    im = Image.fromarray(canvas)
    ImageDraw.Draw(im).text(xy, text, fill=color)
    return np.asarray(im).copy()


def assignment_figure(images: torch.Tensor, assign: torch.Tensor, colors: np.ndarray) -> np.ndarray:
    """``(N,3,R,R)`` uint8 images + ``(N,R,R)`` prototype ids -> ``(N*R + (N+1)*PAD, 3*R + 4*PAD, 3)`` uint8 grid:
    image | assignment map | blend."""
    n, _, r, _ = images.shape
    canvas = np.full((n * r + (n + 1) * PAD, 3 * r + 4 * PAD, 3), 255, dtype=np.uint8)
    for i in range(n):
        img = _hwc(images[i])
        cmap = colors[assign[i].cpu().numpy()]
        blend = (0.5 * img + 0.5 * cmap).astype(np.uint8)
        y = PAD + i * (r + PAD)
        for j, panel in enumerate((img, cmap, blend)):
            x = PAD + j * (r + PAD)
            canvas[y : y + r, x : x + r] = panel
    return canvas


def _segment_cell(img: torch.Tensor, mask: torch.Tensor, color: np.ndarray, cell: int) -> np.ndarray:
    """Crop around ``mask`` (25% margin, square), segment bright + outlined in ``color``, rest dimmed; ``(cell,cell,3)``."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    r = mask.shape[0]
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = int(max(y1 - y0, x1 - x0) * 1.25) + 2
    side = min(max(side, r // 4), r)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    ty, tx = min(max(cy - side // 2, 0), r - side), min(max(cx - side // 2, 0), r - side)
    m = mask.float()
    inner = -F.max_pool2d(-m[None, None], 3, stride=1, padding=1)[0, 0]  # erosion: the outline is mask - inner
    edge = (m - inner) > 0
    out = img.float() * (0.25 + 0.75 * m)  # dim what is not the segment
    out = torch.where(edge[None], torch.tensor(color, dtype=torch.float32).view(3, 1, 1), out)
    crop = out[:, ty : ty + side, tx : tx + side]
    if side > cell:  # shrink smoothly; enlarge with crisp pixels (the outline stays one colour)
        crop = F.interpolate(crop[None], size=(cell, cell), mode="bilinear", align_corners=False, antialias=True)[0]
    else:
        crop = F.interpolate(crop[None], size=(cell, cell), mode="nearest")[0]
    return crop.clamp(0, 255).round().byte().permute(1, 2, 0).numpy()


def concept_figure(cells: list[list[np.ndarray | None]], protos: list[int], usage: list[float], colors: np.ndarray,
                   cell: int) -> np.ndarray:
    """Rows of segment crops -> ``(P*cell + (P+1)*PAD, LABEL_W + M*cell + (M+1)*PAD, 3)`` uint8."""
    p, m = len(cells), max((len(r) for r in cells), default=0)
    canvas = np.full((p * cell + (p + 1) * PAD, LABEL_W + m * cell + (m + 1) * PAD, 3), 255, dtype=np.uint8)
    for i, row in enumerate(cells):
        y = PAD + i * (cell + PAD)
        canvas[y : y + 12, 4:16] = colors[protos[i]]
        canvas = _text(canvas, (4, y + 14), f"#{protos[i]}")
        canvas = _text(canvas, (4, y + 26), f"{100 * usage[i]:.1f}%")
        for j, c in enumerate(row):
            x = LABEL_W + PAD + j * (cell + PAD)
            canvas[y : y + cell, x : x + cell] = 220 if c is None else c
    return canvas


@torch.no_grad()
def _pass(head, samples: Iterable[dict], resolution: int, batch_size: int):
    """Yield per batch: keys, images (B,3,R,R) uint8, assignment (B,R,R), the mean score of each segment (B,K),
    pixels per segment (B,K)."""
    dev = head.device
    k = int(head.k)
    for b in batched(samples, batch_size, resolution, with_label=False):
        images = b["images"]
        scores = head.scores(normalize(images.to(dev))).float()  # (B, K, h, w)
        assign = F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        bsz, _, h, w = scores.shape
        r = images.shape[-1]
        # pixel -> its stride cell; counts[b, k, cell] = pixels of segment k in that cell
        cy = (torch.arange(r, device=dev) * h // r).view(r, 1)
        cx = (torch.arange(r, device=dev) * w // r).view(1, r)
        cell_idx = (cy * w + cx).view(1, r, r)
        flat = (torch.arange(bsz, device=dev).view(bsz, 1, 1) * k + assign) * (h * w) + cell_idx
        counts = torch.bincount(flat.reshape(-1), minlength=bsz * k * h * w).view(bsz, k, h * w).float()
        pixels = counts.sum(-1)  # (B, K)
        pooled = (counts * scores.flatten(2)).sum(-1) / pixels.clamp_min(1)  # (B, K) mean score over the segment
        yield b["keys"], images.cpu(), assign.cpu(), pooled.cpu(), pixels.cpu()


def render_slots(head, samples_fn: Callable[[], Iterable[dict]], out_dir: str | Path, *, num_images: int,
                 top_prototypes: int, num_neighbors: int, resolution: int, batch_size: int = 16) -> dict:
    """Write ``assignments.png`` and ``concepts.png`` under ``out_dir``; return a summary (usage, similarities).

    ``head`` is a fitted :class:`~components.transfer.unsup.clusters.ClusterHead` (``k``, ``device``, ``scores``).
    ``samples_fn()`` returns the val samples (``{"key", "image": uint8 (3,H,W)}``) in a fixed order; it is called
    twice (statistics, then the crops of the chosen segments), so nothing image-sized is held for the whole split.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = int(head.k)
    colors = palette(k)
    min_px = MIN_SEGMENT_FRAC * resolution * resolution

    usage = torch.zeros(k, dtype=torch.float64)
    sims, firsts_img, firsts_assign = [], [], []
    n = 0
    for keys, images, assign, pooled, pixels in _pass(head, samples_fn(), resolution, batch_size):
        usage += pixels.sum(0).double()
        sim = pooled.clone()
        sim[pixels < min_px] = float("-inf")  # absent or too small to show
        sims.append(sim)
        if n < num_images:
            take = min(num_images - n, len(keys))
            firsts_img.append(images[:take])
            firsts_assign.append(assign[:take])
        n += len(keys)
    if n == 0:
        raise UserError("viz: the val split is empty; nothing to draw")
    sims_all = torch.cat(sims)  # (N, K)

    fig = assignment_figure(torch.cat(firsts_img), torch.cat(firsts_assign), colors)
    buf = _png(fig)
    write_bytes_atomic(out / "assignments.png", buf)

    frac = (usage / usage.sum()).float()
    top = torch.argsort(frac, descending=True)[: min(top_prototypes, k)].tolist()
    wanted: dict[int, list[tuple[int, int]]] = {}  # image index -> [(row, col)]
    picked_sims: dict[int, list[float]] = {}
    for row, p in enumerate(top):
        order = torch.argsort(sims_all[:, p], descending=True)[:num_neighbors]
        picked_sims[p] = []
        for col, i in enumerate(order.tolist()):
            if math.isfinite(float(sims_all[i, p])):
                wanted.setdefault(i, []).append((row, col))
                picked_sims[p].append(float(sims_all[i, p]))
    cell = CELL
    cells: list[list[np.ndarray | None]] = [[None] * num_neighbors for _ in top]
    idx = 0
    for keys, images, assign, _, _ in _pass(head, samples_fn(), resolution, batch_size):
        for j in range(len(keys)):
            for row, col in wanted.get(idx + j, []):
                p = top[row]
                cells[row][col] = _segment_cell(images[j], assign[j] == p, colors[p], cell)
        idx += len(keys)
        if idx > max(wanted, default=-1):
            break
    fig2 = concept_figure(cells, top, [float(frac[p]) for p in top], colors, cell)
    write_bytes_atomic(out / "concepts.png", _png(fig2))

    ent = -(frac[frac > 0] * frac[frac > 0].log()).sum().item()
    return {
        "num_images": n,
        "clusters": getattr(head, "kind", None) or "prototypes",
        "num_clusters": k,
        "clusters_used": int((usage > 0).sum()),
        "usage_entropy": ent,
        "usage_entropy_max": math.log(k),
        # nested dicts of numbers (not lists) so that `dvc metrics show` lists every value
        "top": {f"rank{r}": {"prototype": p, "usage": float(frac[p]),
                             "similarity_mean": float(np.mean(picked_sims[p])) if picked_sims[p] else 0.0}
                for r, p in enumerate(top)},
        "neighbor_similarity_mean": float(np.mean([s for v in picked_sims.values() for s in v]))
        if any(picked_sims.values()) else 0.0,
    }


def _png(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG", optimize=True)
    return b.getvalue()


def viz_num_clusters(cfg, shards: str | Path) -> int:
    """K for k-means: ``viz.num_clusters``, else the number of semantic classes the shards' index lists (0: none)."""
    return cfg.num_clusters or len(read_index(shards).get("semantic_classes") or [])


def run_viz(cfg, shards: str | Path, checkpoint: str | Path, out_dir: str | Path, *, tracker=None,
            device: str | None = None) -> dict:
    """Load the pretrained model (any method), draw the figures from the shards' val split; returns the summary.

    The clusters are those of :class:`components.transfer.unsup.clusters.ClusterHead`: the method's learned prototypes
    when it has them (SlotCon: the teacher's scores), else k-means on its dense features (MoCo, SIM; K =
    ``viz.num_clusters``, or the val split's number of semantic classes), so any ``last.pt`` can be drawn.

    - ``assignments.png``: for the first ``num_images`` val images (a fixed set: the shards' order), the image, its
      cluster-assignment map (argmax over K of the scores upsampled to the image; one fixed colour per cluster, the
      same in every figure) and the two blended.
    - ``concepts.png`` (the paper's concept figure, Fig. 3): the ``top_prototypes`` clusters that win most val pixels,
      one row each; a row shows the ``num_neighbors`` val *segments* nearest to that cluster. A segment is the set of
      pixels of one image assigned to the cluster; its similarity is the cluster's score averaged over those pixels
      (each pixel takes the score of the stride-32 cell it lies in: the cosine to the prototype or centroid). Segments
      under 1% of the image are skipped (too small to see). Each cell is a crop around the segment, the segment kept
      bright and outlined in the cluster's colour, the rest dimmed.
    - ``metrics/viz.json``: cluster usage (how many clusters win any pixel, the entropy of their usage) and the
      similarities shown.
    """
    tracker = tracker or Tracker()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    index = read_index(shards)
    split = index.get("val", "val2017")
    urls = split_urls(shards, split)
    loss = SplitLoss(expected_counts(shards, split), split)
    _, method, model = open_pretrained(checkpoint)
    model = model.to(device).eval()

    def samples():  # every pass counts its lost samples; a complete one stops above viz.max_lost_fraction
        it = iterate_samples(urls, decode="rgb", expected_counts=loss.expected)
        for s in it:
            yield {"key": s["key"], "image": s["image"]}
        loss.add(it.errors)
        loss.check(cfg.max_lost_fraction, "viz")

    head = ClusterHead(model, method, viz_num_clusters(cfg, shards), seed=cfg.seed)
    try:
        head.fit(image_batches(samples, cfg.batch_size, cfg.resolution, device))
    except ValueError as exc:  # k-means without a K (no semantic classes, no viz.num_clusters), or no images
        raise UserError(f"{shards}: viz: {exc}") from None
    summary = render_slots(head, samples, out_dir, num_images=cfg.num_images, top_prototypes=cfg.top_prototypes,
                           num_neighbors=cfg.num_neighbors, resolution=cfg.resolution, batch_size=cfg.batch_size)
    summary.update(loss_details([loss]))
    tracker.log_metrics(summary)
    tracker.log_artifact(out_dir, "slots")
    return summary


def _run_stage(ctx) -> dict:
    return run_viz(ctx.cfg, shards_root(ctx.args.shards, ctx.args.params), ctx.args.checkpoint, ctx.args.out, tracker=ctx.tracker)


def _summary(summary: dict) -> str:
    what = {"prototypes": "prototypes", "kmeans": "k-means clusters"}.get(summary.get("clusters"), "clusters")
    return f"{summary['clusters_used']}/{summary['num_clusters']} {what} used on {summary['num_images']} val images"


STAGE = Stage(
    name="viz", section="viz", run=_run_stage, metrics="metrics/viz.json", summary=_summary,
    headline=("prototypes_used",),
    args=(Arg("shards", "data/shards", "shards root (the val split is drawn)"),
          Arg("checkpoint", "models/pretrain/last.pt", "pretrained model (last.pt of any pretrain.method)"),
          Arg("out", "plots/slots", "folder for the PNGs (DVC plots)")),
)
