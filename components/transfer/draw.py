"""Pictures a person would rather look at than read: detections drawn on val images; segmentation predictions of
several models (e.g. supervised vs ReCo) side by side with the image and its ground truth."""
from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from components.io import write_bytes_atomic


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib  # lazy: matplotlib costs ~0.5 s at start-up; only a stage that draws needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    return plt


def _write_png(fig, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(path, buf.getvalue())


def draw_predictions(rows: Sequence[tuple[str, Sequence[tuple[torch.Tensor, dict]]]],
                     categories: Sequence[Mapping[str, Any]], label_to_cat_id: Mapping[int, int],
                     path: str | os.PathLike, *, score_threshold: float = 0.5):
    """One row per model (``(title, [(uint8 image (3, H, W), output), ...])``): masks, boxes, class and score.

    Writes a PNG atomically to ``path`` and returns the matplotlib figure (closed by the caller).
    """
    plt = _pyplot()
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    ncols = max((len(r[1]) for r in rows), default=1) or 1
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3 * ncols, 3 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for r, (title, items) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(items):
                continue
            image, out = items[c]
            canvas = image.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
            keep = (out["scores"] >= score_threshold).nonzero().flatten().tolist()
            if not keep:  # an early model scores low everywhere: show its best 3 (their scores say how unsure)
                keep = list(range(min(3, len(out["scores"]))))
            for j, i in enumerate(keep):
                color = np.array(cmap(j % 10)[:3], dtype=np.float32)
                if "masks" in out:
                    m = (out["masks"][i, 0] > 0.5).numpy()
                    canvas[m] = 0.5 * canvas[m] + 0.5 * color
            ax.imshow(canvas)
            for j, i in enumerate(keep):
                x1, y1, x2, y2 = out["boxes"][i].tolist()
                color = cmap(j % 10)
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color, linewidth=1.2))
                name = names.get(label_to_cat_id.get(int(out["labels"][i]), -1), "?")
                ax.text(x1, y1, f"{name} {float(out['scores'][i]):.2f}", fontsize=6, color="white",
                        bbox=dict(facecolor=color, alpha=0.7, pad=0.5, linewidth=0), va="bottom")
            if c == 0:
                ax.set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    _write_png(fig, path)
    return fig


def class_palette(num_classes: int):
    """``(num_classes + 1, 3)`` float RGB in [0, 1]: distinct colours per class (tab20, then hsv), black for ignore."""
    import matplotlib  # lazy: matplotlib costs ~0.5 s at start-up; only a stage that draws needs it

    cmap = matplotlib.colormaps["tab20" if num_classes <= 20 else "hsv"]
    colors = [cmap(i if num_classes <= 20 else i / num_classes)[:3] for i in range(num_classes)]
    return np.array(colors + [(0.0, 0.0, 0.0)], dtype=np.float32)


def draw_segmentation(images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                      columns: Sequence[tuple[str, Sequence[torch.Tensor]]], class_names: Sequence[str],
                      path: str | os.PathLike):
    """One row per image: the image, its ground truth, then one prediction per model (``columns`` =
    ``[(title, [pred (H, W) class ids per image])]``, e.g. supervised and ReCo), with a class legend.

    ``images`` uint8 ``(3, H, W)``, ``labels`` ``(H, W)`` class ids (255 = ignore, drawn black). Writes a PNG atomically
    to ``path`` and returns the matplotlib figure (closed by the caller).
    """
    plt = _pyplot()
    pal = class_palette(len(class_names))

    def paint(lbl: torch.Tensor):
        idx = lbl.long().clone()
        idx[(idx < 0) | (idx >= len(class_names))] = len(class_names)
        return pal[idx.numpy()]

    titles = ["image", "ground truth", *[t for t, _ in columns]]
    nrows, ncols = max(len(images), 1), len(titles)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.2 * nrows + 0.6), squeeze=False)
    for r in range(nrows):
        panels = ([images[r].permute(1, 2, 0).numpy(), paint(labels[r])] + [paint(preds[r]) for _, preds in columns]
                  if r < len(images) else [])
        for c in range(ncols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(panels):
                ax.imshow(panels[c], interpolation="nearest")
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
    maps = list(labels) + [p for _, preds in columns for p in preds]  # every class drawn gets a legend entry
    shown = sorted({int(v) for m in maps for v in torch.unique(m).tolist() if 0 <= int(v) < len(class_names)})
    handles = [plt.Rectangle((0, 0), 1, 1, color=pal[i]) for i in shown]
    if handles:
        fig.legend(handles, [class_names[i] for i in shown], loc="lower center", ncol=min(len(shown), 6), fontsize=6,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _write_png(fig, path)
    return fig
