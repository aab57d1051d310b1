"""Orchestration only (no ML code): the Prefect flow that runs the DVC stages (flow.py), its MLflow parent run
(mlflow_runs.py) and the one-process scheduled server (serve.py); ``prefect.yaml`` holds the work-pool deployments."""
