"""Rich progress bars for long CLI work (`kiln simulate`, `kiln demo`): one bar per stage, plain lines when not a terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def bar(description: str, total: int) -> Iterator[Callable[[str], None]]:
    """A bar of ``total`` steps; the yielded callable prints a line above the bar and advances it by one."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total)

        def step(message: str) -> None:
            if message:
                progress.console.print(message, highlight=False)
            progress.advance(task)

        yield step
