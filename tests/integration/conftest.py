"""Real services for the prod profile, started by the tests on 127.0.0.1 and always stopped.

PostgreSQL from ``/usr/lib/postgresql/15/bin`` (initdb + pg_ctl in a temp folder, run as the ``postgres`` user when
the tests run as root), a moto S3 server, an ``mlflow server`` on that Postgres with S3 artifacts, and a Dagster
instance whose run/event/schedule storage is that Postgres. One set for the package (both modules share it and the
trained `fraud` world); ``test_prod_profile`` runs before ``test_faults``, which changes registry and endpoint state.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kiln.spec import spec_data
from tests.conftest import FRAUD_SPEC, free_port

PG_BIN = Path(os.environ.get("KILN_PG_BIN", "/usr/lib/postgresql/15/bin"))
BUCKET = "kiln-it"
DAYS = 3
ROWS = 1500
WAIT_S = 180.0
VENV_BIN = Path(sys.executable).parent


def _as_pg_user() -> list[str]:
    """``runuser -u postgres --`` when root (initdb refuses root), nothing otherwise."""
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"]
    pytest.fail("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port>, trust auth, user ``kiln``."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            pytest.fail(f"PostgreSQL binaries not found in {PG_BIN} (apt-get install postgresql-15, or set KILN_PG_BIN)")
        self.dir = Path(tempfile.mkdtemp(prefix="kiln-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.prefix = _as_pg_user()
        if self.prefix:
            user = pwd.getpwnam(self.prefix[2])
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "kiln", "--no-sync", "-E", "UTF8"])

    def _run(self, cmd: list[str], timeout: float = WAIT_S) -> None:
        proc = subprocess.run([*self.prefix, *cmd], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def start(self) -> None:
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.dir} -c fsync=off -c max_connections=60"
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-o", opts, "-w", "-t", "120", "start"])

    def stop(self) -> None:
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"])

    def url(self, db: str) -> str:
        return f"postgresql://kiln@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> None:
        import psycopg

        conn = psycopg.connect(self.url("postgres"), connect_timeout=10, autocommit=True)
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()

    def query(self, db: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        conn = psycopg.connect(self.url(db), connect_timeout=10)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall())
        finally:
            conn.close()

    def destroy(self) -> None:
        try:
            self.stop()
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on Postgres (backend store) and moto S3 (``--artifacts-destination``, ``--serve-artifacts``)."""

    def __init__(self, backend_uri: str, s3_endpoint: str, workdir: Path) -> None:
        self.backend_uri, self.s3_endpoint, self.workdir = backend_uri, s3_endpoint, workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = os.environ | {"MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.workdir / f"mlflow-{self.port}.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", self.backend_uri, "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--serve-artifacts"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir, start_new_session=True,
        )
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log_text = (self.workdir / f"mlflow-{self.port}.log").read_text()[-3000:]
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}: {log_text}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy on {self.url} within {WAIT_S:.0f}s")

    def stop(self) -> None:
        import signal

        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


DEPLOY_DAGSTER_YAML = Path(__file__).resolve().parents[2] / "deploy" / "dagster.yaml"


def dagster_yaml(pg: Postgres) -> dict[str, Any]:
    """Instance config: Postgres storage, and the run queue and concurrency limits of ``deploy/dagster.yaml`` as shipped
    (one `<p>_retrain` per pipeline); the run launcher stays Dagster's default (runs in local processes, no cluster)."""
    deployed = yaml.safe_load(DEPLOY_DAGSTER_YAML.read_text())
    return {
        "storage": {"postgres": {"postgres_db": {"hostname": "127.0.0.1", "port": pg.port, "db_name": "dagster",
                                                 "username": "kiln", "password": "", "scheme": "postgresql+psycopg2"}}},
        "run_coordinator": deployed["run_coordinator"],
        "concurrency": deployed["concurrency"],
        "telemetry": {"enabled": False},
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the end-to-end assertions before the fault tests (the integration items stay contiguous)."""
    order = ("test_prod_profile.py", "test_faults.py", "test_prod_loop.py")
    positions = [i for i, item in enumerate(items) if item.path.name in order and item.path.parent.name == "integration"]
    if not positions:
        return
    chosen = sorted((items[i] for i in positions), key=lambda item: order.index(item.path.name))
    for i, item in zip(positions, chosen):
        items[i] = item


@pytest.fixture(scope="package")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Postgres + moto S3 + MLflow server + a Postgres-backed Dagster instance, and the prod profile's env vars."""
    import boto3
    import dagster as dg
    from moto.server import ThreadedMotoServer

    work = tmp_path_factory.mktemp("prod")
    saved = dict(os.environ)
    pg = Postgres()
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    mlflow_server: MlflowServer | None = None
    instance: Any = None
    try:
        pg.start()
        pg.create_db("dagster")
        pg.create_db("mlflow")
        moto.start()
        s3_url = f"http://127.0.0.1:{moto_port}"
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
        s3 = boto3.client("s3", endpoint_url=s3_url)
        s3.create_bucket(Bucket=BUCKET)
        mlflow_server = MlflowServer(pg.url("mlflow"), s3_url, work)
        mlflow_server.start()
        home = work / "dagster"
        home.mkdir()
        (home / "dagster.yaml").write_text(yaml.safe_dump(dagster_yaml(pg)))
        os.environ.update({
            "KILN_PROFILE": "prod",
            "DAGSTER_HOME": str(home),
            "KILN_S3_ENDPOINT_URL": s3_url,
            "MLFLOW_S3_ENDPOINT_URL": s3_url,
            "KILN_SOURCE_ROOT": f"s3://{BUCKET}/sources",
            "KILN_STORAGE_PREFIX": f"s3://{BUCKET}/storage",
            "KILN_STATE_ROOT": str(work / "state"),
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "KILN_ENDPOINT_TARGET": "local",  # no cluster here: the endpoint is a local `bentoml serve`
            "KILN_STEP_RETRIES": "2",
            "KILN_STEP_RETRY_DELAY": "0.5",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",  # Dagster step retries do the rest; keeps the MLflow-down test short
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
        })
        instance = dg.DagsterInstance.from_config(str(home))
        yield {"pg": pg, "s3": s3, "s3_url": s3_url, "mlflow": mlflow_server, "instance": instance, "work": work, "moto": moto}
    finally:
        if instance is not None:
            instance.dispose()
        if mlflow_server is not None:
            mlflow_server.stop()
        try:
            moto.stop()
        except Exception:
            pass
        pg.destroy()
        os.environ.clear()
        os.environ.update(saved)


def upload_sources(s3: Any, local: Path, prefix: str) -> list[str]:
    """Copy simulated source files into ``s3://<bucket>/<prefix>/``."""
    keys = []
    for file in sorted(local.glob("*.parquet")):
        key = f"{prefix}/{file.name}"
        s3.upload_file(str(file), BUCKET, key)
        keys.append(key)
    return keys


@contextmanager
def store_cleanup(serving: Any, pipeline: str) -> Iterator[None]:
    """On exit, shut the pipeline's endpoint down (router, backends) and delete from the BentoML store every bento and
    model made while open: what a prod test builds is never reused by another test."""
    store = serving.bentoml()
    bentos_before = {str(b.tag) for b in store.bentos.list()}
    models_before = {str(m.tag) for m in store.models.list()}
    try:
        yield
    finally:
        serving.shutdown(pipeline)
        for tag in {str(b.tag) for b in store.bentos.list()} - bentos_before:
            store.bentos.delete(tag)
        for tag in {str(m.tag) for m in store.models.list()} - models_before:
            store.models.delete(tag)


@pytest.fixture(scope="package")
def prod_world(services: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The `fraud` pipeline simulated into S3, ingested and retrained in the prod profile, with its endpoint up."""
    from kiln.spec import load_spec
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest, retrain, simulate, source_partitions
    from resources.serving import ServingResource

    spec_dir = tmp_path_factory.mktemp("pipelines")
    data = spec_data(FRAUD_SPEC)
    data["serving"]["port"] = free_port()
    (spec_dir / "fraud.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    os.environ["KILN_PIPELINES_DIR"] = str(spec_dir)
    spec = load_spec(spec_dir / "fraud.yaml")
    defs = build_definitions([spec], "prod")
    serving = ServingResource(state_root=os.environ["KILN_STATE_ROOT"], bentoml_home=os.environ["BENTOML_HOME"])
    with store_cleanup(serving, "fraud"):  # local tests must never reuse a bento or model this package builds
        local = tmp_path_factory.mktemp("sim")
        simulate(spec, local, DAYS, ROWS, seed=5, start=date(2026, 1, 1))
        keys = upload_sources(services["s3"], local, f"sources/{spec.source.path}")
        instance = services["instance"]
        partitions = source_partitions(spec, local)
        ingested = ingest(defs, spec, partitions, instance, progress=lambda _: None)
        trained = retrain(defs, spec, instance, progress=lambda _: None)
        yield {"spec": spec, "defs": defs, "instance": instance, "ingested": ingested, "trained": trained,
               "partitions": partitions, "source_keys": keys, "serving": serving, "local_sources": local}
