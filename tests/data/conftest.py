"""Fixtures only the data tests use: COCO annotation files read / written back, the generated ILSVRC tree, the
messy folder's expected outcome, single pictures, and single loader samples."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures import expose
from fixtures.images import loader_sample
from fixtures.trees import MESSY, exif_jpeg, picture, write_imagenet


def read_instances(root: Path, split: str) -> dict:
    """The parsed ``annotations/instances_<split>.json`` of a COCO tree."""
    return json.loads((Path(root) / "annotations" / f"instances_{split}.json").read_text())


def write_instances(root: Path, split: str, data: dict) -> None:
    """Writes ``data`` back as ``annotations/instances_<split>.json``."""
    (Path(root) / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


@pytest.fixture(scope="session")
def messy_outcome():
    """What prepare must report for the messy folder: ``.skips`` (by reason), ``.ok``, ``.transcode``, ``.excluded``."""
    return MESSY


# the helpers above (and those of tests/fixtures/ only the data tests use) as fixtures of the same names
read_instances_fixture = expose(read_instances)
write_instances_fixture = expose(write_instances)
write_imagenet_fixture = expose(write_imagenet)
picture_fixture = expose(picture)
exif_jpeg_fixture = expose(exif_jpeg)
loader_sample_fixture = expose(loader_sample)
