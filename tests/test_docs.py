"""docs/METHODS.md, the ours-vs-released page: it covers every method, every row gives its verdict, and every params
key it names exists in the schema (so a renamed key cannot leave the page describing a setting that is gone)."""
from __future__ import annotations

import re
from pathlib import Path

from components.config.load import SECTIONS

DOC = Path(__file__).resolve().parents[1] / "docs" / "METHODS.md"


def _tables(text: str) -> dict[str, list[list[str]]]:
    """``{"## heading": [row cells, ...]}`` of the page's tables (header and rule rows left out)."""
    out: dict[str, list[list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("|") and not set(line) <= set("|- ") and heading:
            out.setdefault(heading, []).append([c.strip() for c in line.strip("|").split(" | ")])
    return out


def test_every_method_has_a_table_whose_rows_all_give_a_verdict():
    tables = _tables(DOC.read_text())
    for method in ("SlotCon", "SIM", "MoCo v2", "ReCo"):
        heading = next((h for h in tables if h.startswith(method)), None)
        assert heading, f"docs/METHODS.md: no section for {method}"
        rows = tables[heading][1:]  # after the header row
        assert len(rows) >= 8, (method, len(rows))
        assert {"Architecture", "Loss", "BatchNorm"} <= {r[0] for r in rows}, method
        for row in rows:
            assert len(row) == 4 and all(row), (method, row[0])  # ours, released, why (or "=")


def _key_exists(dotted: str) -> bool:
    section, *path = dotted.split(".")
    node = SECTIONS.get(section)
    for name in path:
        fields = getattr(node, "model_fields", {})
        if name not in fields:
            return False
        node = fields[name].annotation
    return node is not None


def test_params_keys_named_on_the_page_exist():
    names = set(re.findall(r"`((?:pretrain|segment|semisup|detect|probe|unsup|export)\.[a-z_0-9.]+)`",
                           DOC.read_text()))
    assert "pretrain.sim.warmup_epochs" in names
    missing = sorted(n for n in names if not n.endswith(".py") and not _key_exists(n))
    assert not missing, f"docs/METHODS.md names params keys the schema does not have: {missing}"
