"""A flow that only logs one line: what the schedule test's deployment runs on the stack's worker (seconds)."""
from __future__ import annotations

from prefect import flow, get_run_logger

LINE = "tick from the stack's worker"  # the schedule test looks for it


@flow(name="slotcon-stack-tick", persist_result=False)
def tick() -> str:
    get_run_logger().info(LINE)
    return LINE
