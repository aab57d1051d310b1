import numpy as np
import torch
from PIL import Image

from components.transfer.viz import CELL, LABEL_W, PAD, palette, render_slots


def _model():
    from components.slotcon.model import SlotCon

    torch.manual_seed(0)
    return SlotCon(arch="resnet18", num_prototypes=6, dim_hidden=16, dim_out=8).eval()


def _samples(n=5, size=(72, 64)):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        img = torch.zeros(3, *size, dtype=torch.uint8)
        img[:, : size[0] // 2] = torch.randint(0, 255, (3, 1, 1), generator=g, dtype=torch.uint8)
        img[:, size[0] // 2 :] = torch.randint(0, 255, (3, 1, 1), generator=g, dtype=torch.uint8)
        img = (img.float() + 20 * torch.randn(img.shape, generator=g)).clamp(0, 255).to(torch.uint8)
        out.append({"key": f"{i:04d}", "image": img})
    return out


def test_viz_writes_valid_pngs_of_the_expected_size(tmp_path):
    samples = _samples()
    r = 64
    summary = render_slots(_model(), lambda: iter(samples), tmp_path / "slots", num_images=3, top_prototypes=2,
                           num_neighbors=4, resolution=r, batch_size=2)
    with Image.open(tmp_path / "slots" / "assignments.png") as im:
        im.verify()
    with Image.open(tmp_path / "slots" / "assignments.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (3 * r + 4 * PAD, 3 * r + 4 * PAD)  # (width, height): image | map | blend, 3 rows
        arr = np.asarray(im)
    # the map panel of row 0 holds only palette colours
    panel = arr[PAD : PAD + r, 2 * PAD + r : 2 * PAD + 2 * r].reshape(-1, 3)
    pal = {tuple(c) for c in palette(6).tolist()}
    assert {tuple(c) for c in np.unique(panel, axis=0).tolist()} <= pal
    with Image.open(tmp_path / "slots" / "concepts.png") as im:
        assert im.format == "PNG" and im.size == (LABEL_W + 4 * CELL + 5 * PAD, 2 * CELL + 3 * PAD)
    assert summary["num_images"] == 5 and 1 <= summary["prototypes_used"] <= 6
    assert list(summary["top"]) == ["rank0", "rank1"]
    assert summary["top"]["rank0"]["usage"] >= summary["top"]["rank1"]["usage"]


def test_palette_is_fixed_and_distinct():
    p = palette(32)
    assert p.shape == (32, 3) and p.dtype == np.uint8
    assert len({tuple(c) for c in p.tolist()}) == 32
    assert np.array_equal(p[:8], palette(8))  # the same prototype keeps its colour whatever K is drawn
