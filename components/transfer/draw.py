"""Pictures a person would rather look at than read: detections drawn on val images, segmentation side by side."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch


def draw_predictions(rows: Sequence[tuple[str, Sequence[tuple[torch.Tensor, dict]]]],
                     categories: Sequence[Mapping[str, Any]], label_to_cat_id: Mapping[int, int],
                     path: str | os.PathLike, *, score_threshold: float = 0.5):
    """One row per model (``(title, [(uint8 image (3, H, W), output), ...])``): masks, boxes, class and score.

    Writes a PNG atomically to ``path`` and returns the matplotlib figure (closed by the caller).
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from components.io import write_bytes_atomic

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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(path, buf.getvalue())
    return fig
