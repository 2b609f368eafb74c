"""serving.collector.settle: a serving process's loaded objects are frozen and full collections become rare."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from serving.collector import FULL_EVERY, settle


@pytest.fixture
def collector_state() -> Iterator[None]:
    """Leave the test process's collector as it was: thresholds restored, frozen objects handed back."""
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_settle_freezes_what_is_alive_and_spaces_full_collections(collector_state: None) -> None:
    kept = [object() for _ in range(10)]  # noqa: F841 - alive across settle(): frozen with the rest
    young, middle, _ = gc.get_threshold()
    gc.unfreeze()
    settle()
    assert gc.get_freeze_count() > 1000  # the interpreter, pytest and the test's objects
    assert gc.get_threshold() == (young, middle, FULL_EVERY)
    assert FULL_EVERY > 10  # Python's default: a full collection after every 10 collections of the middle generation


def test_cycles_made_after_settle_are_still_collected(collector_state: None) -> None:
    import weakref

    settle()

    class Node:
        def __init__(self) -> None:
            self.other: Node | None = None

    def cycle() -> weakref.ref[Node]:
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    first = cycle()
    for _ in range(20 * gc.get_threshold()[0]):  # enough allocations for the collector's own young collections
        cycle()
    assert first() is None  # freed by an automatic collection: settle() leaves the collector on
