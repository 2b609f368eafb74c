"""Kiln's micro-batcher against BentoML's own adaptive batching, head to head, on the same LightGBM model.

Why Kiln's endpoint batches in its worker (:mod:`serving.batching`) rather than with BentoML's ``batchable`` APIs: this
script serves one model three ways, each a `bentoml serve` of one worker, each a typed ``POST /predict
{"rows": [[...features...]]}``:

- **kiln**: the API awaits :class:`serving.batching.MicroBatcher`, which scores queued requests together;
- **depends**: the API awaits a model service behind ``bentoml.depends`` whose ``predict`` is
  ``@bentoml.api(batchable=True)`` (BentoML's documented way to batch a model);
- **self**: a ``batchable`` API on the same service, called through the service's own ``to_async`` client.

All three use the same batch bound (``MAX_ROWS``) and the same LightGBM booster (trained here on synthetic data, one
thread). Load: 1-row requests at 16 keep-alive connections for ``--seconds``, in ``--rounds`` paired rounds (the three
back to back), from a separate process (``benchmarks/servers.py load``). Every answer is checked against the model's
offline prediction first. Ends with ``BENCH batching rps_kiln=<n> rps_depends=<n> rps_self=<n> errors_kiln=<n>
errors_depends=<n> errors_self=<n>`` (the round with the median kiln/depends ratio; errors: failed requests over every
run of that variant). Run: ``.venv/bin/python benchmarks/batching.py``
(``--seconds 5 --rounds 2`` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from servers import free_port, load, stop, wait_ready  # this folder's shared helpers

REPO = Path(__file__).resolve().parent.parent
CONNECTIONS = 16
FEATURES = 12
MAX_ROWS = 100
VARIANTS = {"kiln": "KilnBatcher", "depends": "Front", "self": "SelfBatched"}

SERVICES = '''
import os

import bentoml
import lightgbm as lgb
import numpy as np

from serving.batching import MicroBatcher

MAX_ROWS = int(os.environ["BENCH_MAX_ROWS"])
QUIET = {"access": {"enabled": False}}


def booster():
    return lgb.Booster(model_file=os.environ["BENCH_MODEL"])


@bentoml.service(workers=1, logging=QUIET)
class KilnBatcher:
    def __init__(self) -> None:
        self.model = booster()
        self.batcher = MicroBatcher(self.score, MAX_ROWS, 0.02)

    def score(self, parts):
        return self.model.predict(np.concatenate(parts), num_threads=1)

    @bentoml.api
    async def predict(self, rows: list[list[float]]) -> list[float]:
        x = np.asarray(rows, dtype=float)
        return [float(v) for v in await self.batcher.submit(x, len(x))]


@bentoml.service(workers=1, logging=QUIET)
class Model:
    def __init__(self) -> None:
        self.model = booster()

    @bentoml.api(batchable=True, max_batch_size=MAX_ROWS, max_latency_ms=1000)
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x, num_threads=1)


@bentoml.service(workers=1, logging=QUIET)
class Front:
    model = bentoml.depends(Model)

    @bentoml.api
    async def predict(self, rows: list[list[float]]) -> list[float]:
        return [float(v) for v in await self.model.to_async.predict(np.asarray(rows, dtype=float))]


@bentoml.service(workers=1, logging=QUIET)
class SelfBatched:
    def __init__(self) -> None:
        self.model = booster()

    @bentoml.api(batchable=True, max_batch_size=MAX_ROWS, max_latency_ms=1000)
    def score(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x, num_threads=1)

    @bentoml.api
    async def predict(self, rows: list[list[float]]) -> list[float]:
        return [float(v) for v in await self.to_async.score(np.asarray(rows, dtype=float))]
'''


def train(folder: Path) -> tuple[Path, list[float], float]:
    """A LightGBM classifier on synthetic data; returns its file, one feature row and that row's offline prediction."""
    import lightgbm as lgb
    import numpy as np

    rng = np.random.default_rng(7)
    x = rng.normal(size=(20_000, FEATURES))
    y = (x[:, 0] + 0.5 * x[:, 1] * x[:, 2] + rng.normal(scale=0.5, size=len(x)) > 0).astype(int)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_threads": 1}, lgb.Dataset(x, y), num_boost_round=100)
    path = folder / "model.txt"
    booster.save_model(str(path))
    row = [float(v) for v in x[0]]
    return path, row, float(booster.predict(np.asarray([row]), num_threads=1)[0])


def serve(folder: Path, service: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`bentoml serve services:<service>` on a free port; waits for /readyz."""
    port = free_port()
    log = folder / f"{service}.log"
    cmd = [sys.executable, "-m", "bentoml", "serve", f"services:{service}", "--working-dir", str(folder),
           "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/readyz", proc, log)
    return proc, url, log


def main() -> int:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="kiln-bench-batching-"))
    model, row, expected = train(folder)
    (folder / "services.py").write_text(SERVICES)
    env = os.environ | {"BENCH_MODEL": str(model), "BENCH_MAX_ROWS": str(MAX_ROWS), "PYTHONPATH": str(REPO),
                        "BENTOML_HOME": str(folder / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    body = json.dumps({"rows": [row]}).encode()
    procs: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    try:
        for name, service in VARIANTS.items():
            proc, url, _ = serve(folder, service, env)
            procs.append(proc)
            urls[name] = f"{url}/predict"
            answer = httpx.post(urls[name], content=body, headers={"Content-Type": "application/json"}, timeout=30)
            answer.raise_for_status()
            got = float(answer.json()[0])
            assert abs(got - expected) <= 1e-9, f"{name}: {got} != offline {expected}"
            load(urls[name], body, CONNECTIONS, 2.0)  # warm-up
        print(f"one row, three services: {expected:.12f} each (the same model)", flush=True)
        rounds = []
        for i in range(args.rounds):
            rounds.append({name: load(url, body, CONNECTIONS, args.seconds) for name, url in urls.items()})
            r = rounds[-1]
            print(f"  round {i + 1}: " + ", ".join(f"{n} {r[n]['rps']:.0f} rps (p99 {r[n]['p99_ms']:.1f} ms, errors "
                                                     f"{r[n]['errors']})" for n in VARIANTS), flush=True)
    finally:
        for proc in procs:
            stop(proc)

    ratios = [r["kiln"]["rps"] / max(r["depends"]["rps"], 1e-9) for r in rounds]
    chosen = rounds[ratios.index(sorted(ratios)[len(ratios) // 2])]
    errors = {n: sum(r[n]["errors"] for r in rounds) for n in VARIANTS}
    print(f"kiln/depends median {statistics.median(ratios):.2f}x, kiln/self median "
          f"{statistics.median(r['kiln']['rps'] / max(r['self']['rps'], 1e-9) for r in rounds):.2f}x")
    print(f"BENCH batching rps_kiln={chosen['kiln']['rps']:.0f} rps_depends={chosen['depends']['rps']:.0f} "
          f"rps_self={chosen['self']['rps']:.0f} " + " ".join(f"errors_{n}={e}" for n, e in errors.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
