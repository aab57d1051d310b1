"""MLflow tracking: the store (:mod:`.store`), what a stage logs through (:mod:`.tracker`), one run per stage
(:mod:`.runs`) under its pipeline's parent run (:mod:`.parent`), and lineage (:mod:`.lineage`). The names stages and
pipelines use are re-exported here; the submodules import each other directly, never this package.
"""
from components.tracking.store import StoreError, ensure_experiment, open_store, tracking_uri
from components.tracking.tracker import Tracker, flatten, is_sentinel, numeric_items
from components.tracking.lineage import datasets_for, file_md5, tag_model_versions
from components.tracking.parent import close_parent, headline_metrics, open_parent, run_name
from components.tracking.runs import FLOW_RUN_ENV, PARENT_ENV, stage_run

__all__ = [
    "FLOW_RUN_ENV", "PARENT_ENV", "StoreError", "Tracker", "close_parent", "datasets_for", "ensure_experiment",
    "file_md5", "flatten", "headline_metrics", "is_sentinel", "numeric_items", "open_parent", "open_store", "run_name",
    "stage_run", "tag_model_versions", "tracking_uri",
]
