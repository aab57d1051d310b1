"""Orchestration only (no ML code): Prefect flows that run the DVC stages (flow.py) and the method comparison
(compare.py), their MLflow parent runs (mlflow_runs.py), model promotion (registry.py) and a one-process scheduled
server (serve.py); ``prefect.yaml`` holds the work-pool deployments.

Importing the package first sets the offline switches every flow process needs (before Prefect, DVC or MLflow load).
"""
import os

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# run without a Prefect server, a flow starts a temporary one; its default 20 s start-up timeout fails on a busy CPU
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
