"""MLflow tracking for stages and flows: where to log, a fast reachability check, runs, datasets and artifacts.

The package: `connection` (where to log, the check, params and tags), `reporter` (the MLflow reporter, outages,
artifacts), `spool` (stage events forwarded by the flow process), `run` (a stage's run, the flow's parent run);
the names other code uses are imported here.

Design choices:
- The tracking URI is `MLFLOW_TRACKING_URI` when set, else `sqlite:///<workspace>/mlflow.db` with artifacts in
  `<workspace>/mlartifacts` (with any sqlite store, artifacts go beside the database). The workspace is the
  *original* one, so stages that DVC runs in temporary experiment copies still log to the workspace's MLflow.
- Every stage process logs its own run (so plain `dvc repro` is tracked too); with LMCYCLE_PARENT_RUN_ID set it
  becomes that run's child. Under a flow, the flow's forwarder makes it a child of the flow's run.
  LMCYCLE_TRACKING=off turns tracking off for a process.
- mlflow is imported only inside functions: `import mlflow` plus its sqlite store cost ~4 s per process. Under the
  flow a stage does not pay it at all: it appends its events to a spool file (LMCYCLE_SPOOL_DIR) and the flow
  process, which has mlflow loaded already, forwards them to the child run live (`SpoolForwarder`).
- Runs are driven through `MlflowClient` with explicit run ids (no global active run), so a reporter can be used
  from any thread and the training loop never sees MLflow.
"""

from lmcore.lifecycle.tracking.connection import (  # noqa: F401
    CHECK_TIMEOUT_S,
    FLOW_RUN_ENV,
    MAX_ARTIFACT_BYTES,
    MAX_PARAM_CHARS,
    MAX_TAG_CHARS,
    PARENT_RUN_ENV,
    RETRY_AFTER_OUTAGE_S,
    SPOOL_ENV,
    STAGE_HTTP_RETRIES,
    SYSTEM_METRICS_INTERVAL_S,
    TRACKING_ENV,
    WEIGHT_SUFFIXES,
    TrackingError,
    artifact_location,
    check_tracking,
    connect,
    environment_tags,
    flatten,
    lineage_tags,
    numeric,
    params_for_keys,
    tracking_enabled,
    tracking_uri,
)
from lmcore.lifecycle.tracking.reporter import MLflowReporter, log_stage_inputs, log_stage_outputs  # noqa: F401
from lmcore.lifecycle.tracking.run import run_link, stage_run, start_parent_run  # noqa: F401
from lmcore.lifecycle.tracking.spool import SpoolForwarder, SpoolReporter  # noqa: F401
