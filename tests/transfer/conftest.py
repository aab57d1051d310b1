"""Fixtures the transfer tests share: ``scenes_folder``, a tiny two-class dataset in the scenes layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from fixtures import expose


def scenes_folder(root: Path, n: int = 3, size: int = 48) -> Path:
    """A tiny dataset in the scenes layout: two colour regions = two classes (ids 3 and 7)."""
    rng = np.random.default_rng(0)
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        (root / "stuffthingmaps_trainval2017" / split).mkdir(parents=True)
        for i in range(n):
            lbl = np.full((size, size), 3, np.uint8)
            c = int(rng.integers(12, 36))
            lbl[c:, :] = 7
            img = np.where(lbl[..., None] == 3, [200, 40, 40], [40, 40, 200]).astype(np.uint8)
            Image.fromarray(img).save(root / split / f"{i:012d}.jpg")
            Image.fromarray(lbl).save(root / "stuffthingmaps_trainval2017" / split / f"{i:012d}.png")
    (root / "annotations").mkdir()
    (root / "annotations" / "semantic_classes.json").write_text(
        json.dumps([{"id": 3, "name": "red", "isthing": 0}, {"id": 7, "name": "blue", "isthing": 0}])
    )
    return root


# the helper above as a fixture of the same name
scenes_folder_fixture = expose(scenes_folder)
