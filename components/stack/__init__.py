"""The lab's team stack on one machine: PostgreSQL, an S3 store (SeaweedFS), an MLflow server (metadata in
PostgreSQL, artifacts proxied to the bucket), a Prefect server (on PostgreSQL) with a process work pool and a worker.

:mod:`.settings` says where and on which ports, :mod:`.procs` starts and stops detached processes by PID,
:mod:`.services` defines each server, :mod:`.cli` is ``slotcon stack up | down | status``.
"""
