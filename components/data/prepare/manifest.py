"""What ``prepare`` writes for every source, and what its readers need: the manifest columns and their ``slotcon``
metadata record, reading a manifest back, the printed list of skips, the totals, and the source root of
``index.json``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MAX_LISTED = 10_000  # failures listed one by one in the manifest metadata (counts are always complete)
PRINTED = 20  # skips printed per split; the rest are in the manifest metadata
# the columns of every source's manifest (one row per usable image); tree sources append theirs after these
MANIFEST_FIELDS = [
    ("key", pa.string()), ("id", pa.int64()), ("file_name", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("mode", pa.string()), ("bytes", pa.int64()), ("sha1", pa.string()),
    ("num_annotations", pa.int32()), ("seg_file", pa.string()),
]


def slotcon_schema(fields: list[tuple[str, Any]], meta: dict[str, Any] | None) -> pa.Schema:
    """A Parquet schema whose metadata ``slotcon`` holds ``meta`` as sorted JSON (what was skipped, the counts)."""
    return pa.schema(fields, metadata=None if meta is None else {"slotcon": json.dumps(meta, sort_keys=True)})


def read_manifest(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (as dicts) and the ``slotcon`` metadata of a manifest written by ``prepare`` or ``shard``."""
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"slotcon", b"{}"))
    return table.to_pylist(), meta


def print_skips(split: str, failures: list[dict[str, Any]]) -> None:
    """One line for each of the first skipped files of ``split``, then how many more the manifest lists."""
    for f in failures[:PRINTED]:
        print(f"prepare: {split}: skipped {f['file']}: {f['reason']} ({f['detail']})")
    if len(failures) > PRINTED:
        print(f"prepare: {split}: ... {len(failures) - PRINTED} more, see the manifest metadata")


def add_totals(metrics: dict[str, Any], seconds: float) -> None:
    """The splits' images, skips and bytes summed into ``metrics``, with the time and files checked per second."""
    splits = metrics["splits"].values()
    ok, skipped = sum(m["images"] for m in splits), sum(m["skipped"] for m in splits)
    metrics.update(images=ok, skipped=skipped, bytes=sum(m["bytes"] for m in splits), seconds=round(seconds, 3),
                   img_per_s=round((ok + skipped) / max(seconds, 1e-9), 1))


def root_ref(root: Path, out_dir: Path) -> str:
    """The source root as ``index.json`` records it: a relative root relative to ``out_dir``, so the index does not
    depend on where the repository is checked out."""
    return str(root) if root.is_absolute() else os.path.relpath(root.resolve(), out_dir.resolve())


def resolve_root(raw_dir: str | os.PathLike, index: dict[str, Any]) -> Path:
    """The source root recorded by ``prepare`` (stored relative to the raw folder unless absolute)."""
    root = Path(index["root"])
    return root if root.is_absolute() else Path(raw_dir) / root
