"""Shared names, defined once: where state lives under the state root, MLflow tags and aliases, Dagster run tags.

Nobody rebuilds ``reference/<p>/reference.json`` or ``"kiln.previous_champion"`` by hand: import the name from here.
Paths are relative (POSIX) so the same names serve a local folder and an ``s3://`` state root.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------- state store (under KILN_STATE_ROOT)


def state_key(pipeline: str, kind: str, *parts: str) -> str:
    """``<kind>/<pipeline>[/<part>...]``: the one layout of the state root."""
    return "/".join((kind, pipeline, *parts))


REFERENCE = "reference"  # drift references and sample request rows of the served champion
DRIFT = "drift"  # windows, decisions and drift reports
PREDICTIONS = "predictions"  # the endpoints' prediction logs
ENDPOINTS = "endpoints"  # endpoint records (router, backends, k8s manifests)
CHECKPOINTS = "checkpoints"  # training checkpoints (torch)
TELEMETRY = "telemetry"  # the endpoints' /predict counters (requests by status class, rows, latency histogram)


def reference_file(pipeline: str) -> str:
    """The served champion's drift reference."""
    return state_key(pipeline, REFERENCE, "reference.json")


def features_reference_file(pipeline: str, data_version: str) -> str:
    """The drift reference of one training set (`<p>/features` data version)."""
    return state_key(pipeline, REFERENCE, f"features-{data_version}.json")


def sample_rows_file(pipeline: str) -> str:
    """Request rows from the training source, for smoke tests and `kiln demo`'s sample curl."""
    return state_key(pipeline, REFERENCE, "sample_rows.json")


def windows_dir(pipeline: str) -> str:
    """Drift windows (bin counts): one JSON object per observed window, named by :func:`kiln.state.time_key` of its
    ``until``, so the names sort in time order and a reader lists only those after its cursor."""
    return state_key(pipeline, DRIFT, "windows")


def decisions_dir(pipeline: str) -> str:
    """Drift decisions: one JSON object per drift-sensor tick that decided (its decisions, in window order)."""
    return state_key(pipeline, DRIFT, "decisions")


def last_decision_file(pipeline: str) -> str:
    """The newest drift decision (for `kiln status`)."""
    return state_key(pipeline, DRIFT, "last_decision.json")


def realized_file(pipeline: str) -> str:
    """Realized performance per window from delayed labels, and the label counts (`<p>/labels`)."""
    return state_key(pipeline, DRIFT, "realized.json")


def retrain_decisions_dir(pipeline: str) -> str:
    """Retrain decisions (which signal fired, why, launched or skipped): one JSON object each."""
    return state_key(pipeline, DRIFT, "retrain_decisions")


def drift_reports_dir(pipeline: str) -> str:
    """Per-window drift reports (histograms, PSI tables)."""
    return state_key(pipeline, DRIFT, "reports")


def predictions_dir(pipeline: str) -> str:
    """The prediction log of a pipeline's endpoints."""
    return state_key(pipeline, PREDICTIONS)


def telemetry_dir(pipeline: str) -> str:
    """The telemetry objects of a pipeline's endpoints (kiln/telemetry.py): per-interval deltas of /predict counters."""
    return state_key(pipeline, TELEMETRY)


def endpoints_dir(pipeline: str) -> str:
    """Endpoint records of a pipeline."""
    return state_key(pipeline, ENDPOINTS)


def k8s_manifests_file(pipeline: str) -> str:
    """The rendered Deployment + Service of a prod endpoint."""
    return state_key(pipeline, ENDPOINTS, "k8s.yaml")


def checkpoints_dir(pipeline: str) -> str:
    """Training checkpoints of a pipeline."""
    return state_key(pipeline, CHECKPOINTS)


# ------------------------------------------------------------------------------------------- MLflow names

CHAMPION_ALIAS = "champion"
REFERENCE_ARTIFACT = "drift/reference.json"  # a trained model's drift reference, on its MLflow run
SPEC_ARTIFACT = "kiln/spec.json"  # the spec a model was trained from, on its MLflow run
CHECKSUM_TAG = "kiln_sha256"  # model version: sha256 of its artifacts, set once registration completed
STEP_TAG = "kiln_step"  # model version: which Dagster step registered it
DAGSTER_RUN_TAG = "dagster_run_id"  # model version: the Dagster run that trained it
FEATURES_VERSION_TAG = "features_data_version"  # model version: data version of its training features
PROMOTED_TAG = "kiln.promoted_by"  # model version: set by the champion gate
PREVIOUS_CHAMPION_TAG = "kiln.previous_champion"  # model version: the champion it replaced
ROLLED_BACK_BY_TAG = "kiln.rolled_back_by"
ROLLED_BACK_FROM_TAG = "kiln.rolled_back_from"
ROLLED_BACK_AT_TAG = "kiln.rolled_back_at"
ROLLBACK_REASON_TAG = "kiln.rollback_reason"
START_EPOCH_TAG = "kiln.start_epoch"  # run: the epoch a (resumed) training started at
RESUMED_FROM_EPOCH_TAG = "kiln.resumed_from_epoch"
RESUMED_FROM_RUN_TAG = "kiln.resumed_from_run"

# --------------------------------------------------------------------------------------- Dagster run tags

PIPELINE_RUN_TAG = "kiln/pipeline"
RETRAIN_RUN_TAG = "kiln/retrain"  # deploy/dagster.yaml: one retrain per pipeline at a time
TRIGGER_RUN_TAG = "kiln/trigger"
TRAINER_OP_TAG = "kiln/trainer"
SOURCE_FILE_TAG = "kiln/source_file"


def source_issues_file(pipeline: str) -> str:
    """Source files the `<p>_new_data` sensor does not ingest (misnamed, impossible date, ...) with why, for `kiln status`."""
    return state_key(pipeline, "sources", "issues.json")


KEYS = "keys"  # per partition, the key hashes of the rows that reached `<p>/validated`


def key_index_dir(pipeline: str) -> str:
    """The key index of a pipeline: one parquet file per validated partition (`<partition>.parquet`)."""
    return state_key(pipeline, KEYS)
