"""CLI progress: a rich bar for `kiln simulate`, and one line per Dagster step (outcome, seconds, failing rules) for `kiln demo`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


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


STEP_EVENTS = ("STEP_START", "STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED", "ASSET_CHECK_EVALUATION")
OUTCOMES = {"STEP_SUCCESS": "ok", "STEP_FAILURE": "FAILED", "STEP_SKIPPED": "skipped"}
MAX_SAMPLES = 3


@dataclass
class StepOutcome:
    """One step of a finished Dagster run, read back from the run's event log."""

    step: str  # the step key, e.g. ``fraud__raw``
    outcome: str = "running"  # ok | FAILED | skipped | running (no end event)
    seconds: float = 0.0
    error: str | None = None  # the first line of a step failure that is not a failed check
    checks: list[Any] = field(default_factory=list)  # the dg.AssetCheckEvaluation objects the step emitted

    @property
    def label(self) -> str:
        """The asset key as the UI writes it (Dagster names a step by its key path joined with ``__``)."""
        return self.step.replace("__", "/")


def step_outcomes(instance: Any, run_id: str) -> list[StepOutcome]:
    """Every step of a run in the order it started, with outcome, duration and asset-check evaluations."""
    import dagster as dg

    types = {dg.DagsterEventType(name) for name in STEP_EVENTS}
    steps: dict[str, StepOutcome] = {}
    started: dict[str, float] = {}
    for entry in instance.all_logs(run_id, of_type=types):
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        step = steps.setdefault(event.step_key, StepOutcome(event.step_key))
        kind = event.event_type_value
        if kind == "STEP_START":
            started[event.step_key] = entry.timestamp
        elif kind == "ASSET_CHECK_EVALUATION":
            step.checks.append(event.event_specific_data)
        else:
            step.outcome = OUTCOMES[kind]
            step.seconds = entry.timestamp - started.get(event.step_key, entry.timestamp)
            if kind == "STEP_FAILURE":
                step.error = _failure_text(event)
    return list(steps.values())


def _failure_text(event: Any) -> str | None:
    error = getattr(event.event_specific_data, "error", None)
    while error is not None and getattr(error, "cause", None) is not None:
        error = error.cause  # the user code's own exception, under Dagster's wrapper
    message = str(getattr(error, "message", "") or "").strip()
    return message.splitlines()[0] if message else None


def partition_label(run_tags: dict[str, str]) -> str:
    """The partition (or partition range) a run covered, from its Dagster tags; '' when unpartitioned."""
    if "dagster/partition" in run_tags:
        return run_tags["dagster/partition"]
    start, end = run_tags.get("dagster/asset_partition_range_start"), run_tags.get("dagster/asset_partition_range_end")
    if start and end:
        return start if start == end else f"{start}..{end}"
    return ""


def step_lines(outcomes: list[StepOutcome], partition: str = "", planned: tuple[str, ...] = ()) -> list[str]:
    """One line per step (outcome, seconds, asset, partition) and, under it, every failing rule of a failed check.

    ``planned`` assets (``<p>/<stage>``) the run never started (a step before them failed) get a ``skipped`` line."""
    lines = []
    suffix = f"  [{partition}]" if partition else ""
    for step in outcomes:
        lines.append(f"  {step.outcome:<7} {step.seconds:6.1f}s  {step.label}{suffix}")
        failed = [c for c in step.checks if not c.passed]
        lines.extend(line for check in failed for line in check_lines(check))
        if step.error and not any(_blocking(c) for c in failed):
            lines.append(f"{'':18}error: {step.error}")
    ran = {step.label for step in outcomes}
    lines.extend(f"  {'skipped':<7} {'-':>7}  {label}{suffix}" for label in planned if label not in ran)
    return lines


def _blocking(evaluation: Any) -> bool:
    return str(getattr(evaluation.severity, "value", evaluation.severity)).upper() == "ERROR"


def check_lines(evaluation: Any) -> list[str]:
    """A failed check as a person reads it: the check, then each failing rule with column, rows and sample values."""
    key = "/".join(evaluation.asset_key.path)
    level = "blocking" if _blocking(evaluation) else "warning"
    metadata = evaluation.metadata or {}
    lines = [f"{'':18}{level}: check {key}:{evaluation.check_name} failed"]
    failures = metadata["failures"].value if "failures" in metadata else None
    if not failures:
        summary = metadata["summary"].value if "summary" in metadata else evaluation.description
        if summary:
            lines.append(f"{'':20}{summary}")
        return lines
    for failure in failures:
        parts = [f"{failure.get('column') or '(table)'}: {failure.get('rule')}"]
        count, percent = failure.get("unexpected_count"), failure.get("unexpected_percent")
        if count:
            parts.append(f"{count} rows" + (f" ({percent:.1f}%)" if isinstance(percent, int | float) else ""))
        elif failure.get("observed"):  # a rule about the table or file, not rows: what was found instead
            parts.append(f"observed {failure['observed']}")
        samples = [str(v) for v in (failure.get("sample_values") or [])[:MAX_SAMPLES]]
        if samples:
            parts.append(f"e.g. {', '.join(samples)}")
        lines.append(f"{'':20}{'  '.join(parts)}")
    return lines
