"""The local router (serving/router.py) over real sockets, against small aiohttp backends: the route table of
kiln.release (canary weights, shadow mirror), headers it drops or adds, a reload under load that fails no request and
drains the old backend, its limits and its /metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kiln.release import route_table
from kiln.spec import PipelineSpec, load_spec
from serving.router import Router, request_key, routes_config, share_of
from tests.conftest import FRAUD_SPEC, free_port


class Backend:
    """A stand-in for a `bentoml serve` backend: answers /predict with its version, remembers what it was sent."""

    def __init__(self, version: str, delay: float = 0.0) -> None:
        self.version = version
        self.delay = delay
        self.seen: list[tuple[dict[str, str], bytes]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runner: Any = None

    async def start(self) -> Backend:
        from aiohttp import web

        async def predict(request: web.Request) -> web.Response:
            body = await request.read()
            self.seen.append((dict(request.headers), body))
            await asyncio.sleep(self.delay)
            rows = json.loads(body)["rows"]
            return web.json_response({"predictions": [float(self.version)] * len(rows), "model_version": self.version},
                                     headers={"X-Kiln-Model-Version": self.version})

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(text=f'kiln_requests_total{{model_version="{self.version}",status="200"}} 1.0\n')

        app = web.Application()
        app.router.add_post("/predict", predict)
        app.router.add_get("/metrics", metrics)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    def record(self) -> dict[str, Any]:
        return {"url": self.url, "version": self.version, "pid": None, "model_tag": f"p:{self.version}"}


def _spec(mode: str, share: float = 0.0) -> PipelineSpec:
    spec = load_spec(FRAUD_SPEC)
    release = spec.serving.release.model_copy(update={"mode": mode, "challenger_share": share})
    return spec.model_copy(update={"serving": spec.serving.model_copy(update={"release": release})})


def write_config(path: Path, champion: Backend, challenger: Backend | None = None, mode: str = "none", share: float = 0.0) -> None:
    table = route_table(_spec(mode, share), champion.version, challenger.version if challenger else None)
    path.write_text(json.dumps({
        "admin_token": "tok", "champion": champion.record(), "challenger": challenger.record() if challenger else None,
        "mode": mode, "share": share, "key_column": "txn_id", "arm_log": str(path.parent / "arms.jsonl"),
        "routes": routes_config(table),
    }))


def run(scenario: Callable[[Router, str, Any], Awaitable[None]], config: Path, max_body: int | None = None) -> None:
    """Serve a router on a free port for the scenario, with an aiohttp client session; then stop it."""
    import aiohttp

    async def main() -> None:
        router = Router(config)
        if max_body is not None:
            router.max_body = max_body
        port = free_port()
        ready = asyncio.Event()
        serving = asyncio.get_running_loop().create_task(router.serve("127.0.0.1", port, ready))
        await ready.wait()
        try:
            async with aiohttp.ClientSession() as http:
                await scenario(router, f"http://127.0.0.1:{port}", http)
        finally:
            assert router.stopping is not None
            router.stopping.set()
            await serving

    asyncio.run(main())


def body_for(key: str) -> bytes:
    return json.dumps({"rows": [{"txn_id": key, "amount": 1.0}]}).encode()


def test_canary_sends_exactly_the_keys_below_the_challengers_weight_to_it(tmp_path: Path) -> None:
    config = tmp_path / "router.json"

    async def scenario(router: Router, url: str, http: Any) -> None:
        champion, challenger = await Backend("1").start(), await Backend("2").start()
        write_config(config, champion, challenger, "canary", 0.3)
        router.load()
        assert [w for _, w in router.routes.backends] == [70, 30]
        served: dict[str, str] = {}
        for i in range(300):
            async with http.post(f"{url}/predict", data=body_for(f"k{i}")) as r:
                assert r.status == 200
                served[f"k{i}"] = (await r.json())["model_version"]
                assert r.headers["X-Kiln-Arm"] == ("challenger" if served[f"k{i}"] == "2" else "champion")
        expected = {k: "2" if share_of(k) * 100 < 30 else "1" for k in served}
        assert served == expected  # the hash of the key decides, nothing else
        assert 0.2 < sum(v == "2" for v in served.values()) / len(served) < 0.4
        assert len(challenger.seen) == sum(v == "2" for v in served.values())
        for i in range(20):  # stable: the same key lands in the same arm again
            async with http.post(f"{url}/predict", data=body_for(f"k{i}")) as r:
                assert (await r.json())["model_version"] == served[f"k{i}"]

    write_config(config, Backend("1"))  # placeholder until the backends are up
    run(scenario, config)


def test_shadow_mirrors_every_request_and_never_serves_the_challenger(tmp_path: Path) -> None:
    config = tmp_path / "router.json"

    async def scenario(router: Router, url: str, http: Any) -> None:
        champion, challenger = await Backend("1").start(), await Backend("2").start()
        write_config(config, champion, challenger, "shadow")
        router.load()
        for i in range(40):
            async with http.post(f"{url}/predict", data=body_for(f"s{i}")) as r:
                assert r.status == 200 and (await r.json())["model_version"] == "1" and r.headers["X-Kiln-Arm"] == "champion"
        for _ in range(200):
            if len(challenger.seen) == 40:
                break
            await asyncio.sleep(0.02)
        assert len(champion.seen) == 40 and sorted(b for _, b in challenger.seen) == sorted(b for _, b in champion.seen)
        arms = {k: v.requests for k, v in router.arms.items()}
        assert arms == {"champion:1": 40, "challenger:2": 40}
        router.flush()
        logged = [json.loads(line) for line in (tmp_path / "arms.jsonl").read_text().splitlines()]
        assert {(e["arm"], e["served"]) for e in logged} == {("champion", True), ("challenger", False)}

    write_config(config, Backend("1"))
    run(scenario, config)


def test_client_kiln_headers_are_dropped_and_request_ids_passed_or_made(tmp_path: Path) -> None:
    config = tmp_path / "router.json"

    async def scenario(router: Router, url: str, http: Any) -> None:
        backend = await Backend("1").start()
        write_config(config, backend)
        router.load()
        sneaky = {"X-Kiln-Requests": "1000", "x-kiln-arm": "challenger", "X-Kiln-Admin": "tok", "X-Request-ID": "abc-1"}
        async with http.post(f"{url}/predict", data=body_for("a"), headers=sneaky, skip_auto_headers=["Content-Type"]) as r:
            assert r.status == 200 and r.headers["X-Kiln-Arm"] == "champion" and r.headers["X-Kiln-Model-Version"] == "1"
        async with http.post(f"{url}/predict", data=body_for("b"), headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
        (first, _), (second, _) = backend.seen
        assert not [k for k in first if k.lower().startswith("x-kiln-")]
        assert first["X-Request-ID"] == "abc-1" and len(second["X-Request-ID"]) == 32
        assert "Content-Type" not in first  # none sent, none made up (a backend would refuse application/octet-stream)
        assert second["Content-Type"] == "application/json"

    write_config(config, Backend("1"))
    run(scenario, config)


def test_a_reload_under_load_fails_no_request_and_the_old_backend_drains(tmp_path: Path) -> None:
    config = tmp_path / "router.json"

    async def scenario(router: Router, url: str, http: Any) -> None:
        old, new = await Backend("1", delay=0.3).start(), await Backend("2").start()
        write_config(config, old)
        router.load()

        async def one(i: int) -> tuple[int, str]:
            async with http.post(f"{url}/predict", data=body_for(f"r{i}")) as r:
                return r.status, (await r.json())["model_version"]

        slow = [asyncio.get_running_loop().create_task(one(i)) for i in range(20)]
        await asyncio.sleep(0.1)  # all 20 are with the old backend now
        write_config(config, new)
        async with http.post(f"{url}/_kiln/reload", headers={"X-Kiln-Admin": "tok"}) as r:
            state = await r.json()
        assert r.status == 200 and state["champion"]["version"] == "2"
        assert state["in_flight"] == {old.url: 20}  # what ServingResource.drain waits for before stopping it
        after = [await one(i) for i in range(5)]
        done = await asyncio.gather(*slow)
        assert done == [(200, "1")] * 20 and after == [(200, "2")] * 5
        async with http.get(f"{url}/_kiln/state", headers={"X-Kiln-Admin": "tok"}) as r:
            assert (await r.json())["in_flight"] == {}
        async with http.get(f"{url}/_kiln/state", headers={"X-Kiln-Admin": "wrong"}) as r:
            assert r.status == 403

    write_config(config, Backend("1"))
    run(scenario, config)


def test_limits_metrics_and_a_missing_backend(tmp_path: Path) -> None:
    config = tmp_path / "router.json"

    async def scenario(router: Router, url: str, http: Any) -> None:
        backend = await Backend("1").start()
        write_config(config, backend)
        router.load()
        async with http.post(f"{url}/predict", data=b"x" * 5000) as r:
            assert r.status == 413 and "error" in await r.json()
        async with http.post(f"{url}/predict", data=body_for("m")) as r:
            assert r.status == 200
        async with http.get(f"{url}/metrics") as r:
            text = await r.text()
        assert 'kiln_requests_total{model_version="1",status="200"} 1.0' in text  # the champion's own
        assert 'kiln_router_requests_total{arm="champion",model_version="1",status="200"} 1.0' in text
        async with http.get(f"{url}/livez") as r:
            assert await r.json() == {"status": "ok", "router": True}
        gone = Backend("9")  # never started: connections are refused
        write_config(config, gone)
        router.load()
        async with http.post(f"{url}/predict", data=body_for("g")) as r:
            assert r.status == 503 and "backend unavailable" in (await r.json())["error"]

    write_config(config, Backend("1"))
    run(scenario, config, max_body=4096)


@pytest.mark.parametrize(("body", "key"), [(body_for("t9"), "t9"), (b"not json", "not json"), (b'{"rows": []}', '{"rows": []}')])
def test_request_key(body: bytes, key: str) -> None:
    assert request_key(body, "txn_id") == key
