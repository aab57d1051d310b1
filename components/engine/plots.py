"""Loss curves as a DVC plot (CSV) and a picture (PNG), always rewritten together."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from components.io import write_bytes_atomic, write_text_atomic


def write_loss_plot(rows: Sequence[Mapping[str, float]], csv_path: str | Path, png_path: str | Path | None, *,
                    x: str, ys: Sequence[str], title: str, xlabel: str | None = None) -> None:
    """``csv_path`` (columns ``x, *ys``) and ``png_path`` (one line per column), written atomically. An empty run
    still rewrites both (an empty chart), so a picture never shows another run's curves."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([x, *ys])
    for row in rows:
        writer.writerow([row.get(x, "")] + [_fmt(row.get(k)) for k in ys])
    write_text_atomic(csv_path, buf.getvalue())
    if png_path is None:
        return
    import matplotlib  # lazy: matplotlib costs ~0.5 s at start-up; only a run that draws needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for k in ys:
        pts = [(r[x], r[k]) for r in rows if r.get(k) is not None and math.isfinite(float(r[k]))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 40 else None, ms=3, label=k)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel("loss")
    ax.set_title(title)
    if rows:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no steps run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    data = io.BytesIO()
    fig.savefig(data, format="png")
    plt.close(fig)
    write_bytes_atomic(png_path, data.getvalue())


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{float(v):.6g}"
