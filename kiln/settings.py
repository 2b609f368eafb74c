"""Every ``KILN_*`` environment variable Kiln reads, read here and nowhere else.

Functions, not module constants: tests and the CLI change the environment between calls, and a Dagster code server
reads it when it loads. Each reader names its variable and its default; ``deploy/README.md`` lists them for operators.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

PROFILES = ("local", "prod")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PIPELINES_DIR = REPO_ROOT / "platform_defs" / "pipelines"


def env(name: str, default: str = "", environ: Mapping[str, str] | None = None) -> str:
    """One variable's value (``default`` when unset or empty)."""
    value = (os.environ if environ is None else environ).get(name, "")
    return value if value != "" else default


def current_profile() -> str:
    """``KILN_PROFILE``, default ``local``."""
    profile = env("KILN_PROFILE", "local")
    if profile not in PROFILES:
        raise ValueError(f"KILN_PROFILE: '{profile}' is not one of {', '.join(PROFILES)}")
    return profile


def kiln_home() -> Path:
    """Root of all local state: ``KILN_HOME`` or ``.kiln`` in the current folder."""
    return Path(env("KILN_HOME") or Path.cwd() / ".kiln").resolve()


def local_paths(home: Path | None = None) -> dict[str, Path]:
    """Every folder and file the local profile uses."""
    home = home or kiln_home()
    return {
        "home": home,
        "dagster_home": Path(os.environ.get("DAGSTER_HOME") or home / "dagster"),
        "sources": Path(env("KILN_SOURCE_ROOT") or home / "sources"),
        "storage": home / "storage",
        "state": home / "state",
        "mlflow_db": home / "mlflow.db",
        "mlartifacts": home / "mlartifacts",
        "bentoml": home / "bentoml",
    }


def pipelines_dir() -> Path:
    """The folder of pipeline specs: ``KILN_PIPELINES_DIR`` or the packaged ``platform_defs/pipelines``."""
    override = env("KILN_PIPELINES_DIR")
    return Path(override) if override else DEFAULT_PIPELINES_DIR


def step_retries(profile: str) -> tuple[int, float]:
    """``KILN_STEP_RETRIES`` (default 3 in prod, 0 locally) and ``KILN_STEP_RETRY_DELAY`` (first delay, seconds)."""
    retries = int(env("KILN_STEP_RETRIES", "3" if profile == "prod" else "0"))
    return retries, float(env("KILN_STEP_RETRY_DELAY", "2.0"))


def executor_choice(profile: str) -> str:
    """``KILN_EXECUTOR``: ``k8s`` (prod default), ``multiprocess`` or ``in_process``; empty locally (Dagster's default)."""
    return env("KILN_EXECUTOR", "k8s" if profile == "prod" else "")


def api_key() -> str | None:
    """``KILN_API_KEY``: when set, `/predict` and `/metadata` need ``Authorization: Bearer <key>``."""
    return env("KILN_API_KEY") or None


def user() -> str:
    """Who acts (rollback tags): ``KILN_USER`` or the login name."""
    import getpass

    return env("KILN_USER") or getpass.getuser()


def gpu_node_selector_text(default: str, environ: Mapping[str, str] | None = None) -> str:
    """``KILN_GPU_NODE_SELECTOR``: ``key=value[,key=value]``; set but empty means no selector."""
    return (os.environ if environ is None else environ).get("KILN_GPU_NODE_SELECTOR", default).strip()


def step_config_text(environ: Mapping[str, str] | None = None) -> str:
    """``KILN_K8S_STEP_CONFIG``: a JSON `dagster-k8s/config` merged into every step."""
    return env("KILN_K8S_STEP_CONFIG", "", environ).strip()


def k8s_namespace() -> str:
    """``KILN_K8S_NAMESPACE`` (default ``kiln``): where endpoints are deployed."""
    return env("KILN_K8S_NAMESPACE", "kiln")


def image_registry(environ: Mapping[str, str] | None = None) -> str:
    """``KILN_IMAGE_REGISTRY`` (default ``registry.local/kiln``): where serving images are pushed."""
    return env("KILN_IMAGE_REGISTRY", "registry.local/kiln", environ).rstrip("/")


def image_tag(environ: Mapping[str, str] | None = None) -> str:
    """``KILN_IMAGE_TAG`` (default ``latest``): the tag of a serving image built without a bento version."""
    return env("KILN_IMAGE_TAG", "latest", environ)


def code_image(environ: Mapping[str, str] | None = None) -> str:
    """``KILN_CODE_IMAGE``: the code-location image (in a cluster dagster-k8s takes it from the code location)."""
    return env("KILN_CODE_IMAGE", "kiln/code-location:latest", environ)


def state_root() -> str:
    """``KILN_STATE_ROOT`` (prod): the state store, a folder or ``s3://bucket/prefix`` ('' when unset)."""
    return env("KILN_STATE_ROOT")


def predictions_pvc() -> str | None:
    """``KILN_PREDICTIONS_PVC``: a PersistentVolumeClaim for the endpoint's prediction-log spill folder, so rows the
    store could not take yet survive a pod restart (default: an emptyDir)."""
    return env("KILN_PREDICTIONS_PVC") or None


def endpoint_target() -> str:
    """``KILN_ENDPOINT_TARGET`` (prod): ``kubernetes`` (default: apply the release through the Kubernetes API, wait for
    the rollout, smoke-test, restore on failure), ``gitops`` (render the manifests only) or ``local`` (`bentoml serve`)."""
    return env("KILN_ENDPOINT_TARGET", "kubernetes")


def gateway() -> tuple[str, str] | None:
    """``KILN_GATEWAY=<namespace>/<name>``: the Gateway an HTTPRoute attaches to (None: the pipeline's Service, GAMMA mesh)."""
    value = env("KILN_GATEWAY").strip()
    if not value:
        return None
    namespace, _, name = value.rpartition("/")
    return namespace or "default", name


def release_timeout_s() -> float:
    """``KILN_RELEASE_TIMEOUT_S``: how long a prod release waits for its rollout (default 600)."""
    return float(env("KILN_RELEASE_TIMEOUT_S", "600"))


def s3_endpoint_url() -> str | None:
    """The S3 API endpoint: ``KILN_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` (None: AWS itself)."""
    return env("KILN_S3_ENDPOINT_URL") or env("AWS_ENDPOINT_URL") or None


# ------------------------------------------------------------------ the endpoint process (set by ServingResource)


def model_tag() -> str:
    """``KILN_MODEL_TAG``: the bento model an endpoint serves (required inside a bento)."""
    tag = env("KILN_MODEL_TAG")
    if not tag:
        raise RuntimeError("KILN_MODEL_TAG is not set: the endpoint does not know which bento model to serve")
    return tag


def prediction_log_root() -> str | None:
    """``KILN_PREDICTION_LOG_ROOT``: the state root (folder or ``s3://``) the endpoint ships its prediction log to as
    Parquet objects (serving/predlog.py); None: no log."""
    return env("KILN_PREDICTION_LOG_ROOT") or None


def prediction_log_flush_rows() -> int:
    """``KILN_PREDICTION_LOG_FLUSH_ROWS``: rows per log object at most; a full buffer is flushed at once (default 10,000)."""
    return int(env("KILN_PREDICTION_LOG_FLUSH_ROWS", "10000"))


def prediction_log_flush_seconds() -> float:
    """``KILN_PREDICTION_LOG_FLUSH_SECONDS``: the longest a logged row waits before it is flushed (default 10)."""
    return float(env("KILN_PREDICTION_LOG_FLUSH_SECONDS", "10"))


def prediction_log_spill_dir() -> str:
    """``KILN_PREDICTION_LOG_SPILL_DIR``: local disk for rows the store could not take yet (default: under the temp dir)."""
    import tempfile

    return env("KILN_PREDICTION_LOG_SPILL_DIR") or str(Path(tempfile.gettempdir()) / "kiln-predlog")


def prediction_log_max_spill_rows() -> int:
    """``KILN_PREDICTION_LOG_MAX_SPILL_ROWS``: rows kept on local disk while the store is down; beyond, the oldest are
    dropped and counted (default 1,000,000)."""
    return int(env("KILN_PREDICTION_LOG_MAX_SPILL_ROWS", "1000000"))


def replica() -> str:
    """``KILN_REPLICA``: this endpoint replica's name in log object keys (default: the host name, the pod name in k8s)."""
    import socket

    return env("KILN_REPLICA") or socket.gethostname()


def serving_workers() -> int:
    """``KILN_WORKERS``: BentoML workers of an endpoint (default 1)."""
    return int(env("KILN_WORKERS", "1"))


def access_log() -> bool:
    """``KILN_ACCESS_LOG=1``: BentoML access logs on."""
    return env("KILN_ACCESS_LOG") == "1"

