"""``python -m pipelines.registry``: the registered backbone's versions, and the explicit promotion to ``@champion``.

Every ``slotcon export`` registers a new version of ``tracking.registered_model`` with the alias ``@candidate``; the
downstream stages add their headline figures to it as tags (``detect.bbox_AP``, ``segment.mIoU``,
``unsup_seg.mIoU``). Promotion is a deliberate step, never automatic:

    python -m pipelines.registry show                         # versions, aliases, figures
    python -m pipelines.registry promote                      # @candidate -> @champion if it beats the champion
    python -m pipelines.registry promote --metric segment.mIoU --version 3
    python -m pipelines.registry promote --force              # promote even if it does not beat the champion

``promote`` compares the candidate's ``--metric`` tag (default ``detect.bbox_AP``, falling back to the first of
``segment.mIoU`` / ``unsup_seg.mIoU`` that both versions carry) with the champion's; higher is better. Without a
champion the candidate is promoted. The decision is recorded as tags on the promoted version.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from components.config import load_section
from components.errors import UserError
from components.tracking import open_store

DEFAULT_METRICS = ("detect.bbox_AP", "segment.mIoU", "unsup_seg.mIoU")


def _client_and_name(params: str):
    cfg = load_section("tracking", params)
    client, _ = open_store(cfg)
    return client, cfg.registered_model


def _version(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - no such alias
        return None


def decide(candidate_tags: dict, champion_tags: dict | None, metric: str | None) -> tuple[bool, str, str | None]:
    """``(promote?, reason, metric used)`` from the two versions' tags (pure: tested without a store)."""
    metrics = [metric] if metric else list(DEFAULT_METRICS)
    if champion_tags is None:
        have = next((m for m in metrics if m in candidate_tags), None)
        return True, "no champion yet", have
    for m in metrics:
        if m in candidate_tags and m in champion_tags:
            cand, champ = float(candidate_tags[m]), float(champion_tags[m])
            if cand >= champ:
                return True, f"{m} {cand:.4g} >= champion's {champ:.4g}", m
            return False, f"{m} {cand:.4g} < champion's {champ:.4g}", m
    return False, (f"no figure to compare: {' / '.join(metrics)} missing on the candidate or the champion (run the "
                   "downstream stages for it first, or pass --metric / --force)"), None


def promote(params: str, version: str | None, metric: str | None, force: bool) -> int:
    client, name = _client_and_name(params)
    cand = client.get_model_version(name, version) if version else _version(client, name, "candidate")
    if cand is None:
        print(f"pipelines.registry: no @candidate version of {name}: run the export stage first", file=sys.stderr)
        return 2
    champ = _version(client, name, "champion")
    if champ is not None and champ.version == cand.version:
        print(f"{name} v{cand.version} is already @champion")
        return 0
    ok, why, used = decide(dict(cand.tags), dict(champ.tags) if champ else None, metric)
    if not ok and not force:
        print(f"pipelines.registry: {name} v{cand.version} not promoted: {why} (--force promotes anyway)",
              file=sys.stderr)
        return 1
    client.set_registered_model_alias(name, "champion", cand.version)
    client.set_model_version_tag(name, cand.version, "slotcon.promoted",
                                 f"{time.strftime('%Y-%m-%dT%H:%M:%S')} by {os.environ.get('USER', '?')}: "
                                 f"{why}{' (forced)' if force and not ok else ''}")
    before = f" (was v{champ.version})" if champ else ""
    print(f"{name} v{cand.version} is now @champion{before}: {why}{' (forced)' if force and not ok else ''}")
    return 0


def show(params: str) -> int:
    client, name = _client_and_name(params)
    try:
        model = client.get_registered_model(name)
    except Exception:  # noqa: BLE001
        print(f"no registered model {name} yet (run the export stage)")
        return 0
    by_version: dict[str, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        by_version.setdefault(str(v), []).append("@" + alias)
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    for v in versions:
        figures = ", ".join(f"{k}={v.tags[k]}" for k in sorted(v.tags) if k.split(".")[0] in
                            ("detect", "segment", "unsup_seg"))
        print(f"{name} v{v.version} {' '.join(by_version.get(str(v.version), []))}  run {v.run_id[:8]}  "
              f"{v.tags.get('arch', '')}  {figures or '(no downstream figures yet)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.registry", description=__doc__.split("\n")[0])
    p.add_argument("--params", default="params.yaml")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("show", help="versions, aliases and downstream figures")
    pr = sub.add_parser("promote", help="@candidate (or --version) -> @champion if it beats the champion")
    pr.add_argument("--version", default=None)
    pr.add_argument("--metric", default=None, help=f"tag to compare (default: first of {', '.join(DEFAULT_METRICS)})")
    pr.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.cmd == "show":
            return show(args.params)
        return promote(args.params, args.version, args.metric, args.force)
    except UserError as exc:
        print(f"pipelines.registry: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
