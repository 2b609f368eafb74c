"""Whether to launch `<p>_retrain`: the spec's retrain signals weighed, and whether there is anything new to learn from.

Drift alone is a weak reason to retrain: inputs can move without hurting the model, and a retrain on the same rows
gives the same model. :func:`decide_retrain` weighs the signals a spec enables (``retrain.signals``) -- drift, an
estimated performance drop (no labels needed), a realized drop (from labels), the champion's age -- and launches only
when one fired *and* enough new labeled rows arrived since the champion's training window (``retrain.min_new_rows``).
It always says which signal fired and why, in a sentence a person can read.

Pure: no Dagster, no clock, no files. Cooldowns and run keys belong to the caller (the drift sensor, the backtest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.spec import PipelineSpec

# The order a launch names its signal in when several fired: the most direct evidence that the model got worse first.
PRIORITY = ("realized_performance", "estimated_performance", "drift", "schedule")
TOLERANCE = 1e-12  # float round-off: 0.90 - 0.88 is a drop of exactly 0.02, not "more than" it


@dataclass
class RetrainDecision:
    """What one evaluation of the retrain signals decided."""

    launch: bool
    signal: str | None  # the signal the decision is about (the first fired one in PRIORITY order), None when none fired
    reason: str  # one sentence a person can read
    fired: list[str]  # every enabled signal that fired this time, in PRIORITY order
    details: dict[str, Any] = field(default_factory=dict)  # per signal: enabled, fired, reason; rows and age


def _window_value(window: dict[str, Any], kind: str, metric: str) -> float | None:
    """A window's value of the metric for ``estimated`` (``{"value", "lower", "upper"}``) or ``realized`` (a number)."""
    entry = (window.get(kind) or {}).get("metrics", {}).get(metric)
    value = entry.get("value") if isinstance(entry, dict) else entry
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def performance_drop(spec: PipelineSpec, windows: list[dict[str, Any]], reference: dict[str, float],
                     kind: Literal["estimated", "realized"]) -> tuple[bool, str]:
    """Whether the metric stayed below the reference by more than the allowed drop for ``consecutive_windows`` windows.

    ``windows`` are oldest first. A window that has no ``kind`` entry at all is not a window of that kind (its labels
    have not arrived yet, or it was not estimated) and is passed over; one that has the entry but no value for the
    metric (too few labels, a single class) breaks the streak. Returns (fired, why)."""
    retrain = spec.retrain
    metric = retrain.metric
    allowed = retrain.estimated_drop if kind == "estimated" else retrain.realized_drop
    needed = retrain.consecutive_windows
    baseline = reference.get(metric)
    if baseline is None or math.isnan(float(baseline)):
        return False, f"no reference {metric} to compare the {kind} {metric} with"
    baseline = float(baseline)
    values = [_window_value(w, kind, metric) for w in windows if w.get(kind) is not None]
    if not values:
        return False, f"no {kind} {metric} yet (reference {baseline:.4f})"
    streak: list[float] = []
    for value in reversed(values):
        if value is None or baseline - value <= allowed + TOLERANCE:
            break
        streak.append(value)
    streak.reverse()
    last = values[-1]
    shown = "none" if last is None else f"{last:.4f}"
    if len(streak) >= needed:
        recent = ", ".join(f"{v:.4f}" for v in streak[-needed:])
        return True, (f"{kind} {metric} fell more than {allowed} below the reference {baseline:.4f} for {needed} window(s) in a row "
                      f"({recent})")
    if streak:
        return False, (f"{kind} {metric} {shown} is more than {allowed} below the reference {baseline:.4f} for {len(streak)} of "
                       f"{needed} window(s)")
    if last is None:
        return False, f"the last window has no {kind} {metric} (reference {baseline:.4f})"
    return False, f"{kind} {metric} {shown} is within {allowed} of the reference {baseline:.4f}"


def decide_retrain(spec: PipelineSpec, *, drift_fired: bool, drift_reason: str, windows: list[dict[str, Any]],
                   reference: dict[str, float], new_labeled_rows: int, champion_age_days: float | None) -> RetrainDecision:
    """Weigh the enabled retrain signals (``spec.retrain_signals``); launch when one fired and ``min_new_rows`` arrived.

    ``drift_fired``/``drift_reason``: the drift rule's verdict (kiln.drift.decide, cooldown left to the caller).
    ``windows``/``reference``: performance windows since the champion, oldest first, and the champion's reference
    metrics (see :func:`performance_drop`). ``new_labeled_rows``: labeled rows newer than the champion's training
    window. ``champion_age_days``: days since the champion was trained (None: unknown, the schedule cannot fire)."""
    retrain = spec.retrain
    enabled = set(spec.retrain_signals)  # the spec's list, or what the pipeline can measure when it names none
    verdicts: dict[str, tuple[bool, str]] = {
        "drift": (bool(drift_fired), drift_reason or ("the drift rule fired" if drift_fired else "no drift")),
        "estimated_performance": performance_drop(spec, windows, reference, "estimated"),
        "realized_performance": performance_drop(spec, windows, reference, "realized"),
    }
    period = retrain.schedule_days
    if period is None:
        verdicts["schedule"] = (False, "no schedule_days set")
    elif champion_age_days is None:
        verdicts["schedule"] = (False, "the champion's age is unknown")
    elif champion_age_days >= period:
        verdicts["schedule"] = (True, f"the champion was trained {champion_age_days:g} day(s) ago (schedule_days {period:g})")
    else:
        verdicts["schedule"] = (False, f"the champion was trained {champion_age_days:g} day(s) ago, under schedule_days {period:g}")

    fired = [name for name in PRIORITY if name in enabled and verdicts[name][0]]
    details: dict[str, Any] = {
        "signals": {name: {"enabled": name in enabled, "fired": verdicts[name][0] and name in enabled, "reason": verdicts[name][1]}
                    for name in PRIORITY},
        "new_labeled_rows": int(new_labeled_rows),
        "min_new_rows": retrain.min_new_rows,
        "champion_age_days": champion_age_days,
    }
    if not fired:
        why = "; ".join(f"{name}: {verdicts[name][1]}" for name in PRIORITY if name in enabled)
        return RetrainDecision(False, None, f"no retrain signal fired ({why})", [], details)
    signal = fired[0]
    also = f" (also fired: {', '.join(fired[1:])})" if len(fired) > 1 else ""
    what = f"{_label(signal)}: {verdicts[signal][1]}{also}"
    if new_labeled_rows < retrain.min_new_rows:
        rows = f"no new labeled data ({new_labeled_rows} < min_new_rows {retrain.min_new_rows})"
        return RetrainDecision(False, signal, f"{what}; {rows}; retrain skipped", fired, details)
    rows = f"{new_labeled_rows} new labeled rows (min_new_rows {retrain.min_new_rows})"
    return RetrainDecision(True, signal, f"{what}; {rows}; retrain launched", fired, details)


def _label(signal: str) -> str:
    return {"drift": "drift detected", "estimated_performance": "estimated performance drop",
            "realized_performance": "realized performance drop", "schedule": "schedule"}[signal]
