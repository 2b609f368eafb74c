"""The endpoint's adaptive micro-batcher (serving/batching.py): order, splitting, isolation of a failing request,
batch bounds and latency bounds, with a real thread-pool scorer."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from serving.batching import MicroBatcher


class Scorer:
    """Scores items (lists of ints) as value * 10, records every batch, and can be slowed or made to fail."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.batches: list[tuple[float, list[list[int]]]] = []
        self.lock = threading.Lock()

    def __call__(self, items: list[list[int]]) -> list[int]:
        with self.lock:
            self.batches.append((time.perf_counter(), items))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and any(self.fail_on in item for item in items):
            raise ValueError(f"cannot score {self.fail_on}")
        return [v * 10 for item in items for v in item]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_each_request_gets_its_own_rows_in_order() -> None:
    scorer = Scorer(delay=0.01)
    batcher: MicroBatcher[list[int]] = MicroBatcher(scorer, max_rows=50, max_latency_s=0.05)
    items = [list(range(i * 100, i * 100 + 1 + i % 4)) for i in range(40)]  # 1 to 4 rows each

    async def go() -> list[Any]:
        return await asyncio.gather(*(batcher.submit(item, len(item)) for item in items))

    results = run(go())
    assert [list(r) for r in results] == [[v * 10 for v in item] for item in items]
    assert len(scorer.batches) < len(items)  # requests really were scored together
    assert all(sum(map(len, batch)) <= 50 for _, batch in scorer.batches)


def test_a_request_that_breaks_scoring_fails_alone() -> None:
    scorer = Scorer(delay=0.02, fail_on=666)
    batcher: MicroBatcher[list[int]] = MicroBatcher(scorer, max_rows=100, max_latency_s=0.05)

    async def go() -> list[Any]:
        first = asyncio.ensure_future(batcher.submit([1], 1))  # keeps the scorer busy while the others queue
        await asyncio.sleep(0.005)
        rest = [batcher.submit([2, 3], 2), batcher.submit([666], 1), batcher.submit([4], 1)]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    first, good, bad, also_good = run(go())
    assert list(first) == [10] and list(good) == [20, 30] and list(also_good) == [40]
    assert isinstance(bad, ValueError) and "666" in str(bad)
    assert any(len(batch) > 1 for _, batch in scorer.batches)  # the failing request was in a shared batch first


def test_batches_respect_max_rows_and_an_oversized_request_goes_alone() -> None:
    scorer = Scorer(delay=0.01)
    batcher: MicroBatcher[list[int]] = MicroBatcher(scorer, max_rows=10, max_latency_s=0.05)

    async def go() -> list[Any]:
        return await asyncio.gather(*[batcher.submit([i] * 3, 3) for i in range(9)], batcher.submit([99] * 12, 12))

    results = run(go())
    assert list(results[-1]) == [990] * 12
    sizes = [sum(map(len, batch)) for _, batch in scorer.batches]
    assert max(size for size in sizes if size != 12) <= 10 and 12 in sizes


def test_an_idle_batcher_dispatches_at_once() -> None:
    scorer = Scorer()
    batcher: MicroBatcher[list[int]] = MicroBatcher(scorer, max_rows=10, max_latency_s=2.0)

    async def go() -> float:
        queued = time.perf_counter()
        await batcher.submit([1], 1)
        return scorer.batches[0][0] - queued

    assert run(go()) < 1.0  # far below the 2 s latency budget: nobody waited for a batch to fill


def test_queue_wait_is_bounded_by_max_latency_even_behind_a_slow_batch() -> None:
    scorer = Scorer(delay=1.5)
    batcher: MicroBatcher[list[int]] = MicroBatcher(scorer, max_rows=10, max_latency_s=0.1, max_parallel=2, inline_rows=0)

    async def go() -> float:
        slow = asyncio.ensure_future(batcher.submit([1], 1))
        await asyncio.sleep(0.05)
        queued = time.perf_counter()
        second = asyncio.ensure_future(batcher.submit([2], 1))
        await asyncio.gather(slow, second)
        started = [t for t, items in scorer.batches if items == [[2]]][0]
        return started - queued

    # Without the bound the second request would wait the whole 1.5 s batch; with it, a parallel batch starts ~0.1 s in.
    assert run(go()) < 1.0


def test_a_bad_score_function_length_is_an_error_not_a_wrong_answer() -> None:
    batcher: MicroBatcher[list[int]] = MicroBatcher(lambda items: [0], max_rows=10, max_latency_s=0.05)

    async def go() -> Any:
        return await batcher.submit([1, 2], 2)

    with pytest.raises(ValueError, match="1 predictions for 2 rows"):
        run(go())


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        MicroBatcher(Scorer(), max_rows=0, max_latency_s=0.01)


def test_small_quick_batches_score_on_the_event_loop_and_slow_ones_in_a_thread() -> None:
    threads: list[str] = []

    def score(items: list[list[int]]) -> list[int]:
        threads.append(threading.current_thread().name)
        if items[0][0] == 2:
            time.sleep(0.1)  # far slower than INLINE_COST_S: the next batches go to the pool
        return [v for item in items for v in item]

    batcher: MicroBatcher[list[int]] = MicroBatcher(score, max_rows=100, max_latency_s=0.05, inline_rows=4)

    async def go() -> None:
        await batcher.submit([1], 1)
        await batcher.submit([5] * 5, 5)  # more rows than inline_rows
        await batcher.submit([2], 1)
        for _ in range(20):
            await batcher.submit([3], 1)

    run(go())
    assert threads[0] == threading.main_thread().name and threads[1].startswith("kiln-batch")
    assert threads[2] == threading.main_thread().name and threads[3].startswith("kiln-batch")
    assert threads[-1] == threading.main_thread().name  # quick again: back on the loop



@pytest.mark.parametrize("rest", [True, False])
def test_after_a_multi_request_batch_the_batcher_rests_unless_told_not_to(rest: bool) -> None:
    """After a batch of several requests the batcher rests about one batch duration so the next batch can grow;
    ``rest=False`` dispatches at once."""
    scorer = Scorer()
    batcher: MicroBatcher[list[int]] = MicroBatcher(scorer, max_rows=100, max_latency_s=3.0, rest=rest)

    async def go() -> float:
        await asyncio.gather(*(batcher.submit([i], 1) for i in range(3)))  # warm: the dispatcher runs
        batcher.cost_s, batcher._last_requests, batcher._last_end = 3.0, 2, time.perf_counter()  # as after a slow batch of 2
        started = time.perf_counter()
        assert await batcher.submit([7], 1) == [70]
        return time.perf_counter() - started

    waited = run(go())
    if rest:
        assert waited > 2.0  # the whole rest (3 s)
    else:
        assert waited < 1.5  # dispatched at once
