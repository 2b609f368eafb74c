"""What the serving benchmarks share: free ports, starting and stopping servers, and the load generator.

``benchmarks/serving.py`` and ``benchmarks/batching.py`` import this file (``from servers import ...``: a script's own
folder is first on ``sys.path``). The load generator runs in its own process, ``python benchmarks/servers.py load
--url ... --body FILE --conns N --seconds S``, and prints one JSON line: requests, errors, rps, p50_ms, p99_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

READY_S = 180.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, ready_s: float = READY_S) -> None:
    """Poll ``url`` until it answers 200; raise with the log's tail if the process exits or ``ready_s`` passes."""
    import httpx

    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {ready_s:.0f}s (log: {log})")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server started with ``start_new_session=True`` (its whole process group; :func:`kiln.process.stop_group`)."""
    from kiln.process import stop_group

    stop_group(proc.pid)
    proc.wait(timeout=10)  # already reaped: only records the return code


# ---------------------------------------------------------------------------------------------------- load generator
async def _load(url: str, body: bytes, headers: dict[str, str], conns: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30), headers=headers) as http:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    async with http.post(url, data=body) as response:
                        await response.read()
                        ok = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                latencies.append(time.perf_counter() - started)
                errors += not ok

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conns)))
        wall = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return {"requests": n, "errors": errors, "rps": n / wall,
            "p50_ms": latencies[n // 2] * 1000 if n else float("nan"),
            "p99_ms": latencies[min(n - 1, int(0.99 * n))] * 1000 if n else float("nan")}


def load(url: str, body: bytes, conns: int, seconds: float) -> dict[str, Any]:
    """Closed-loop load (``conns`` keep-alive connections, ``body`` POSTed as JSON) from its own process for ``seconds``;
    returns requests, errors, rps, p50_ms, p99_ms."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        fh.write(body)
    try:
        cmd = [sys.executable, __file__, "load", "--url", url, "--body", fh.name, "--conns", str(conns), "--seconds", str(seconds)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 120)
    finally:
        os.unlink(fh.name)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description="the serving benchmarks' load generator (one JSON line out)")
    parser.add_argument("cmd", choices=["load"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True)
    parser.add_argument("--conns", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    a = parser.parse_args()
    import uvloop  # the load shares the servers' cores: libuv's loop spends less of them per request than asyncio's

    result = uvloop.run(_load(a.url, Path(a.body).read_bytes(), {"Content-Type": "application/json"}, a.conns, a.seconds))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
