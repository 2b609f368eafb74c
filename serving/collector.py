"""Python's cyclic garbage collector in a serving process: what lives for good is frozen, full collections are rare.

A full collection walks every tracked object that is not frozen, with the server's event loop stopped. Two kinds of
objects made an endpoint's full collections long and frequent:

- what a worker loads before it serves (BentoML, polars, the model: about 230,000 objects) lives as long as the
  worker: :func:`settle` freezes it (``gc.freeze``) once the worker is warm;
- BentoML 1.4's ``TimeoutMiddleware`` schedules one event-loop timer per request
  (``loop.call_later(traffic.timeout, ...)``) and never cancels it, so each request leaves a timer, a future, a
  context and a bound method alive for ``traffic.timeout`` seconds after it was answered: about six tracked objects,
  ``requests/s x timeout`` timers in all. They are freed by reference counting when they fire; the collector only
  walks them.

Measured on one worker (2 shared cores, 1-row requests at 16 connections, ``traffic.timeout`` 30 s) with Python's
default thresholds (700, 10, 10): the objects the collector walked grew by ~9,000 a second, a full collection came
every ~0.6 s, and each stopped the worker for 40 to 150 ms, growing with the live timers. All 16 clients waited
through each stop: direct to the worker 1,650 requests/s with p99 25 to 67 ms and stops of 125 to 155 ms every
~1.1 s. Frozen, with a full collection at most every ``FULL_EVERY`` younger ones (~45 s at that rate), the same
worker answered 2,065 to 2,261 requests/s with p99 12.8 to 15 ms. The endpoint's ``serving.timeout_s`` (the
``traffic.timeout`` it sets, default 10 s) bounds how many timers a full collection walks.

Cycles are still collected: young objects by the frequent young collections, older ones by the rarer full ones.
"""

from __future__ import annotations

import gc

FULL_EVERY = 1000  # collections of the middle generation between two full collections (Python's default: 10)


def settle(full_every: int = FULL_EVERY) -> None:
    """Collect once, freeze everything alive now (it is never walked again), and make full collections rare.

    Call it once a serving process has loaded what it keeps (a worker after its warm-up, the router once listening)."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, full_every)
