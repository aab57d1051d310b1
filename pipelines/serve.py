"""``python -m pipelines.serve``: serve the ``slotcon-pipeline`` flow on a cron schedule from this one process.

No work pool or worker: the process polls the Prefect API and runs scheduled flow runs itself, in this checkout.
Schedules only fire against a real server (``prefect server start`` and ``PREFECT_API_URL`` set); the ephemeral
server that a plain flow run starts never schedules anything. Ctrl-C stops serving and pauses the schedule.

    python -m pipelines.serve --cron "0 2 * * *"            # nightly at 02:00 UTC
    python -m pipelines.serve --cron "*/30 * * * *" -S pretrain.epochs=5 --name pretrain-variant
"""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CRON = "0 2 * * *"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.split("\n")[0])
    p.add_argument("--name", default="slotcon-serve", help="deployment name (default: slotcon-serve)")
    p.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule, UTC (default: {DEFAULT_CRON!r})")
    p.add_argument("--targets", nargs="*", default=None, help="stages (plus upstream); default: all")
    p.add_argument("-S", "--set-param", action="append", default=[], dest="overrides",
                   help="params override section.key=value (repeatable): each run is a DVC experiment")
    p.add_argument("--retries", type=int, default=1)
    args = p.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        print("pipelines.serve: PREFECT_API_URL is not set; schedules need a running server: start one with "
              "`prefect server start` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`", file=sys.stderr)
        return 2
    from pipelines.flow import slotcon_pipeline  # lazy: prefect loads only once the server check passed

    slotcon_pipeline.serve(
        name=args.name,
        cron=args.cron,
        parameters={"targets": args.targets, "params_overrides": args.overrides or None, "retries": args.retries,
                    "repo_dir": os.getcwd()},
        limit=1,  # one DVC workspace: one pipeline run at a time
        tags=["slotcon", "dvc"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
