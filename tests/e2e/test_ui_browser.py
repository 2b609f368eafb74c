"""The Dagster UI in a real browser: `dagster dev` on 127.0.0.1 against a temporary instance, driven by headless Chromium.

Chromium is Debian's (`make install` installs it); Playwright only drives it (no `playwright install`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kiln.process import stop_group
from kiln.spec import spec_data
from tests.conftest import FRAUD_SPEC, REPO, free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ARTIFACTS = REPO / "test-artifacts"
CONTRACT = ("raw", "validated", "features", "model", "champion", "bento", "image", "endpoint", "predictions")
EDGES = {("raw", "validated"), ("validated", "features"), ("features", "model"), ("model", "champion"), ("features", "champion"),
         ("champion", "bento"), ("bento", "image"), ("image", "endpoint"), ("bento", "endpoint"), ("endpoint", "predictions")}
PARTITION = "2026-01-01"
STARTUP_S = 240
RUN_S = 240
LIST_S = 120

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (make install)")


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A `dagster dev` webserver on a free port, its own process group, stopped in teardown."""
    from kiln.spec import load_spec
    from platform_defs.lifecycle import simulate

    home = tmp_path_factory.mktemp("ui-home")
    specs = home / "pipelines"
    specs.mkdir()
    data = spec_data(FRAUD_SPEC)
    data["serving"]["port"] = free_port()
    (specs / "fraud.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_spec(specs / "fraud.yaml")
    simulate(spec, home / "sources" / spec.source.path, 1, 200, seed=5, start=date.fromisoformat(PARTITION))
    (home / "dagster").mkdir()
    port = free_port()
    env = {**os.environ, "KILN_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"), "BENTOML_HOME": str(home / "bentoml"),
           "KILN_PIPELINES_DIR": str(specs), "KILN_PROFILE": "local"}
    env.pop("KILN_SOURCE_ROOT", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (home / "dagster-dev.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {proc.returncode}: {(home / 'dagster-dev.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/server_info", timeout=5).status_code == 200 and _location_loaded(url):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"dagster dev did not load the code location in {STARTUP_S}s")
            time.sleep(1)
        yield {"url": url, "home": home, "spec": spec}
    finally:
        stop_group(proc.pid)
        proc.wait(timeout=10)  # already reaped: only records the return code
        log.close()


def _graphql(url: str, query: str) -> dict[str, Any]:
    response = httpx.post(f"{url}/graphql", json={"query": query}, timeout=30)
    response.raise_for_status()
    return dict(response.json()["data"])


def _location_loaded(url: str) -> bool:
    data = _graphql(url, "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus "
                         "locationOrLoadError { __typename } } } } }")
    entries = data["workspaceOrError"].get("locationEntries", [])
    return bool(entries) and all(e["loadStatus"] == "LOADED" for e in entries)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        yield page
    finally:
        context.close()


def _open(page: Any, url: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(url)
    # A fresh instance greets the first visitor with a "Join the Dagster community" modal over everything: skip it.
    try:
        page.get_by_role("dialog").filter(has_text="Join the Dagster community").get_by_role("button", name="Skip").click(timeout=10_000)
    except PlaywrightTimeout:
        pass


GRAPH_JS = """() => ({
  nodes: [...document.querySelectorAll('svg foreignObject')].map(fo => ({
    name: (fo.querySelector('[class*="assetName"]') || {textContent: ''}).textContent.trim(),
    x: +fo.getAttribute('x'), y: +fo.getAttribute('y'), w: +fo.getAttribute('width'), h: +fo.getAttribute('height')})),
  edges: [...document.querySelectorAll('svg path[marker-end]')].map(p => (p.getAttribute('d').match(/-?[0-9.]+/g) || []).map(Number)),
})"""


def _edges(graph: dict[str, Any]) -> set[tuple[str, str]]:
    """Edges drawn in the lineage SVG, as (upstream, downstream) names: a path leaves one node's right side and ends at another's left."""
    nodes = [n for n in graph["nodes"] if n["name"]]

    def at(x: float, y: float, side: str) -> str | None:
        for n in nodes:
            edge_x = n["x"] + n["w"] if side == "right" else n["x"]
            if abs(edge_x - x) <= 8 and n["y"] <= y <= n["y"] + n["h"]:
                return str(n["name"])
        return None

    found = set()
    for d in graph["edges"]:
        if len(d) < 4:
            continue
        source, target = at(d[0], d[1], "right"), at(d[-2], d[-1], "left")
        if source and target:
            found.add((source, target))
    return found


def test_lineage_of_fraud_shows_the_eight_contract_assets_and_their_edges(ui: dict[str, Any], page: Any) -> None:
    _open(page, f"{ui['url']}/asset-groups/fraud")
    page.get_by_text("predictions", exact=True).first.wait_for()
    page.locator("svg path[marker-end]").nth(len(EDGES) - 1).wait_for(state="attached")
    graph = page.evaluate(GRAPH_JS)
    names = {n["name"] for n in graph["nodes"]}
    assert set(CONTRACT) <= names, f"lineage shows {sorted(names)}"
    edges = _edges(graph)
    assert EDGES <= edges, f"missing edges {sorted(EDGES - edges)}; drawn {sorted(edges)}"
    # The UI's own API agrees with what is drawn.
    data = _graphql(ui["url"], "{ assetNodes { groupName assetKey { path } dependencyKeys { path } } }")
    api_edges = {(up["path"][-1], n["assetKey"]["path"][-1]) for n in data["assetNodes"] if n["groupName"] == "fraud"
                 for up in n["dependencyKeys"]}
    assert EDGES <= api_edges
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "fraud-lineage.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def _runs(url: str) -> list[dict[str, Any]]:
    data = _graphql(url, "{ runsOrError { ... on Runs { results { runId status jobName tags { key value } } } } }")
    return list(data["runsOrError"]["results"])


def test_materialize_from_the_ui_succeeds_and_shows_in_the_run_list(ui: dict[str, Any], page: Any) -> None:
    before = {r["runId"] for r in _runs(ui["url"])}  # the new-data sensor may launch its own ingest runs meanwhile
    _open(page, f"{ui['url']}/assets/fraud/raw")
    page.locator("button", has_text="Materialize").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Launch runs to materialize fraud / raw").wait_for()
    # With more than 90 daily partitions the dialog first offers only the last 90 days; the test partition is older.
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        dialog.get_by_text("Show all partitions").click(timeout=15_000)
    except PlaywrightTimeout:
        pass
    ranges = dialog.locator("input").first
    ranges.fill(PARTITION)
    ranges.press("Enter")
    dialog.locator("button", has_text="Launch 1 run").click()
    deadline = time.monotonic() + 60
    mine: list[dict[str, Any]] = []
    while not mine and time.monotonic() < deadline:
        tags = lambda run: {t["key"]: t["value"] for t in run["tags"]}  # noqa: E731
        mine = [r for r in _runs(ui["url"]) if r["runId"] not in before and tags(r).get("dagster/partition") == PARTITION
                and "dagster/sensor_name" not in tags(r)]
        time.sleep(1)
    assert len(mine) == 1, "the launch dialog started no run for the partition"
    run_id = mine[0]["runId"]
    # The run itself first (through the UI's own API), then what the run list shows for it.
    deadline = time.monotonic() + RUN_S
    while (status := {r["runId"]: r for r in _runs(ui["url"])}[run_id]["status"]) not in ("SUCCESS", "FAILURE", "CANCELED"):
        assert time.monotonic() < deadline, f"run {run_id} still {status} after {RUN_S}s"
        time.sleep(2)
    assert status == "SUCCESS", f"run {run_id} ended {status}"
    _open(page, f"{ui['url']}/runs")
    row = page.locator("[class*='rowGrid']", has=page.locator(f"a[href='/runs/{run_id}']"))  # the runs feed's virtualized rows
    deadline = time.monotonic() + LIST_S
    shown = ""
    while "Success" not in shown:
        # The feed's rows arrive by GraphQL after the page's load event: wait for this run's row, not just for the reload.
        try:
            row.first.get_by_text("Success").wait_for(timeout=20_000)
        except PlaywrightTimeout:
            pass
        try:
            shown = row.first.inner_text(timeout=1_000) if row.count() else ""
        except PlaywrightTimeout:  # the virtualized row was re-rendered between the count and the read
            shown = ""
        assert "Success" in shown or time.monotonic() < deadline, f"run {run_id} succeeded; the run list shows {shown!r} after {LIST_S}s"
        if "Success" not in shown:
            page.reload()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "fraud-runs.png"), full_page=True)
    materialized = _graphql(ui["url"], '{ assetOrError(assetKey: {path: ["fraud", "raw"]}) { ... on Asset { assetMaterializations('
                                       f'partitions: ["{PARTITION}"]) {{ runId }} }} }} }}')
    assert run_id in {m["runId"] for m in materialized["assetOrError"]["assetMaterializations"]}
