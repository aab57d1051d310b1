"""``slotcon check``: validate every params section before any work (the Prefect flow calls it first)."""
from __future__ import annotations

import argparse

from components.config import load_all


def main(args: argparse.Namespace) -> int:
    sections = load_all(args.params)
    print(f"{args.params}: {len(sections)} sections valid ({', '.join(sections)})")
    return 0
