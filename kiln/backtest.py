"""Replay a pipeline's daily source partitions in time order and compare retrain policies, without Dagster, MLflow or BentoML.

Nothing is registered and no run is launched: models are fitted in memory with the spec's trainer, exactly as
`<p>/model` fits them (the older rows trained on, the newest ``evaluation.holdout`` share held out), and judged by the
same core the platform uses: the drift rule (:mod:`kiln.drift`), estimated and realized performance
(:mod:`kiln.performance`, calibrated on the holdout), the retrain policy (:func:`kiln.retrain.decide_retrain`) and the
champion gate (:func:`kiln.evaluation.gate`).

The timeline, one step per day ``t`` after the first ``train_days`` days (on which the first model is trained):

- the current champion scores day ``t``; its realized metric that day (from the day's labels) is what the report shows;
- at the end of day ``t`` the policy sees: drift of day ``t`` against the champion's training reference, the estimated
  metric of every day since the champion (from scores alone), the realized metric of the days whose labels have
  arrived (day ``s`` is labeled at the end of day ``s + label_delay_days``), the labeled rows newer than the champion's
  training window, and the champion's age;
- a launched retrain (at most one per ``cooldown_days``) fits a challenger on the labeled days available then and
  the gate decides whether it serves from day ``t + 1`` on.

Retrain window: the last ``window_days`` labeled days (default: as many days as the first model saw), not all history.
Under concept drift old rows teach the old label mechanism, and a fixed window keeps every training the same cost, so
the policies are compared on when they retrain, not on how much data they train on. ``window_days=0`` trains on all
labeled days instead.

Policies compared: the spec's ``retrain:`` (or another one), never retrain, and retrain every ``every`` days (a
schedule-only policy). Models trained on the same window are fitted once and shared between policies (LightGBM with a
seed is deterministic); each policy is still charged the measured seconds of every training it launched.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.spec import PipelineSpec, RetrainSpec

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

SPEC_POLICY, NEVER, EVERY = "spec", "never", "every"
REFERENCE_ROWS = 100_000  # rows profiled for a model's drift reference (a systematic sample beyond that), as `<p>/model`


@dataclass
class Day:
    """One daily partition: its key (YYYY-MM-DD), the rows that pass the contract, and their features (target kept)."""

    key: str
    source: pl.DataFrame
    features: pl.DataFrame

    @property
    def rows(self) -> int:
        return self.features.height


@dataclass
class Model:
    """A model fitted in memory on days ``first..last`` (indices), with what judging it needs."""

    name: str
    first: int
    last: int
    rows: int
    seconds: float
    predictor: Any
    reference: dict[str, Any]  # the drift reference: training features and scores binned
    calibration: dict[str, Any]  # kiln.performance.fit_calibration on the holdout; "reference" holds the holdout metrics
    holdout: pl.DataFrame
    holdout_score: float  # spec.evaluation.metric on its own holdout (the gate's challenger score)


@dataclass
class RetrainEvent:
    """One launched retrain of a policy: when, on which signal and why, what it cost and what the gate decided."""

    day: str
    day_index: int
    signal: str | None
    fired: list[str]
    reason: str
    model: str
    train_days: str
    rows: int
    seconds: float
    promoted: bool
    gate_reason: str


@dataclass
class PolicyResult:
    """One policy over the replayed days."""

    name: str
    label: str
    days: list[dict[str, Any]] = field(default_factory=list)  # per scored day: realized metric, estimate, drift, decision
    retrains: list[RetrainEvent] = field(default_factory=list)

    @property
    def trainings(self) -> int:
        return len(self.retrains)

    @property
    def training_seconds(self) -> float:
        return sum(r.seconds for r in self.retrains)

    def realized(self) -> list[float | None]:
        return [d["realized"] for d in self.days]

    def mean_realized(self, since: str | None = None, until: str | None = None) -> float | None:
        """Mean realized metric over scored days with ``since <= day < until`` (days without a value are left out)."""
        values = [d["realized"] for d in self.days if d["realized"] is not None and (since is None or d["day"] >= since)
                  and (until is None or d["day"] < until)]
        return sum(values) / len(values) if values else None


@dataclass
class BacktestResult:
    """Every policy over the same days, and the settings of the replay."""

    pipeline: str
    metric: str
    days: list[str]
    rows: int
    train_days: int
    label_delay_days: int
    cooldown_days: int
    every: int
    window_days: int
    policy: dict[str, Any]
    initial: dict[str, Any]
    policies: list[PolicyResult]
    drift_from: str | None = None
    seconds: float = 0.0

    def policy_result(self, name: str) -> PolicyResult:
        return next(p for p in self.policies if p.name == name)


def read_days(spec: PipelineSpec, folder: Path | str, start: str | None = None, end: str | None = None) -> list[Day]:
    """The daily partitions of a source folder in time order (``start``..``end`` inclusive), rows that break the
    contract dropped (as `<p>/validated` quarantines them), featurized as `<p>/features` does."""
    from datetime import date

    from upath import UPath

    from kiln.contracts import cast_to_spec, split_rows
    from kiln.features import feature_table
    from kiln.partitions import classify
    from kiln.source import read_source, source_file

    if spec.source.partitions != "daily":
        raise ValueError(f"{spec.name}: a backtest replays daily partitions; source.partitions is {spec.source.partitions!r}")
    root = UPath(folder)
    names = [p.name for p in root.iterdir()] if root.exists() else []
    keys = sorted(classify(names, spec.source.format, date.fromisoformat(spec.source.start_date)).valid)
    keys = [k for k in keys if (start is None or k >= start) and (end is None or k <= end)]
    if not keys:
        window = f" between {start or 'the start'} and {end or 'the end'}" if start or end else ""
        raise ValueError(f"{spec.name}: no daily source files in {folder}{window}")
    days = []
    for key in keys:
        typed = cast_to_spec(read_source(source_file(root, spec, key), spec), spec)
        good, _ = split_rows(typed, spec)
        source, features = feature_table([good], spec)
        days.append(Day(key, source, features))
    return days


def train_model(spec: PipelineSpec, days: list[Day], first: int, last: int, name: str) -> Model:
    """Fit the spec's trainer on days ``first..last`` as `<p>/model` does; calibrate and profile it on the same rows."""
    import polars as pl

    from kiln.evaluation import score, split_holdout
    from kiln.performance import fit_calibration
    from kiln.reference import training_reference
    from kiln.trainers import trainer_for

    frame = pl.concat([d.features for d in days[first : last + 1]], how="vertical_relaxed")
    train, holdout = split_holdout(frame, spec)
    started = time.perf_counter()
    fitted = trainer_for(spec).fit(train)
    seconds = time.perf_counter() - started
    predictor = fitted.predictor
    holdout_scores = predictor.predict(holdout)
    labels = holdout[spec.target].to_numpy()
    calibration = fit_calibration(holdout_scores, labels)
    sample = frame.gather_every(max(1, -(-frame.height // REFERENCE_ROWS)))
    reference = training_reference(spec, sample, predictor.predict(sample))
    return Model(name, first, last, frame.height, seconds, predictor, reference, calibration, holdout,
                 score(spec.evaluation.metric, labels, holdout_scores))


def day_drift(spec: PipelineSpec, model: Model, day: Day, scores: np.ndarray, state: dict[str, Any],
              now: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The drift rule on one day against the model's reference (cooldown left to the caller); (decision, new state)."""
    import polars as pl

    from kiln.drift import bin_counts, column_scores, column_thresholds, decide
    from kiln.features import profile_frame
    from kiln.reference import PREDICTION

    profile_input, _, _ = profile_frame(spec, day.source, day.features)
    profile_input = profile_input.with_columns(pl.Series(PREDICTION, scores, dtype=pl.Float64))
    counts = bin_counts(profile_input, model.reference)
    column = column_scores(model.reference, counts, spec.drift.method)
    limits = column_thresholds(model.reference, counts["n"], spec.drift.threshold, alpha=spec.drift.alpha, method=spec.drift.method)
    return decide(column, counts["n"], state, now, threshold=spec.drift.threshold, min_samples=spec.drift.min_samples,
                  consecutive_windows=spec.drift.consecutive_windows, cooldown_seconds=0.0,
                  drifted_feature_share=spec.drift.drifted_feature_share, score_key=PREDICTION, thresholds=limits)


def drift_sentence(spec: PipelineSpec, decision: dict[str, Any]) -> str:
    """What the drift rule saw, in words."""
    if decision["action"] == "insufficient":
        return f"{decision['n']} rows < drift.min_samples {spec.drift.min_samples}"
    what = "the prediction score drifted" if decision["prediction_drift"] else (
        f"{decision['share']:.0%} of features drifted (drifted_feature_share {spec.drift.drifted_feature_share:.0%})")
    if not decision["drifted"]:
        return f"no drift ({decision['share']:.0%} of features drifted, max {spec.drift.method} {decision['max_score']:.3f})"
    return (f"{what}, max {spec.drift.method} {decision['max_score']:.3f}, {decision['streak']} of "
            f"{spec.drift.consecutive_windows} window(s) in a row")


def _performance(model: Model, scores: np.ndarray, labels: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    from kiln.performance import estimate_performance, labeled_histograms, realized_performance, score_histogram

    estimated = estimate_performance(model.calibration, score_histogram(model.calibration, scores))
    positives, negatives = labeled_histograms(model.calibration, scores, labels)
    return estimated, realized_performance(model.calibration, positives, negatives)


def _finite(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


class _Trainer:
    """Fits each (first, last) window once; every policy that launches a retrain on it gets the same model."""

    def __init__(self, spec: PipelineSpec, days: list[Day]) -> None:
        self.spec, self.days = spec, days
        self.models: dict[tuple[int, int], Model] = {}

    def __call__(self, first: int, last: int) -> Model:
        if (first, last) not in self.models:
            name = f"m{len(self.models)}"
            self.models[(first, last)] = train_model(self.spec, self.days, first, last, name)
        return self.models[(first, last)]


def _replay(spec: PipelineSpec, days: list[Day], initial: Model, fit: _Trainer, name: str, label: str, *,
            retrain: RetrainSpec | None, train_days: int, label_delay_days: int, cooldown_days: int,
            window_days: int, age_from_launch: bool = False) -> PolicyResult:
    """One policy over days ``train_days..``: score, judge, decide at the end of each day, retrain when launched.

    ``age_from_launch``: the age the schedule sees counts from the last launched retrain, kept or not (a cron), instead
    of from the champion's training (the spec's ``schedule_days``)."""
    from kiln.evaluation import gate, score
    from kiln.retrain import decide_retrain

    policy_spec = spec.model_copy(update={"retrain": retrain}) if retrain is not None else spec
    metric = spec.retrain.metric if retrain is None else retrain.metric
    result = PolicyResult(name, label)
    champion, trained_at = initial, train_days - 1
    windows: list[dict[str, Any]] = []  # one per day served by the champion: its estimate and realized metrics
    drift_state: dict[str, Any] = {}
    last_launch: int | None = None
    for t in range(train_days, len(days)):
        day = days[t]
        scores = champion.predictor.predict(day.features)
        labels = day.features[spec.target].to_numpy()
        estimated, realized = _performance(champion, scores, labels)
        drift, drift_state = day_drift(spec, champion, day, scores, drift_state, now=t * 86_400.0)
        windows.append({"day": t, "estimated": estimated, "realized_later": realized})
        record: dict[str, Any] = {
            "day": day.key, "model": champion.name, "realized": _finite(realized["metrics"].get(metric)),
            "estimated": _finite(estimated["metrics"].get(metric, {}).get("value")), "drift": drift["action"],
            "drift_reason": drift_sentence(spec, drift), "launch": False, "signal": None, "fired": [], "reason": "",
        }
        result.days.append(record)
        if retrain is None:
            record["reason"] = "never retrains"
            continue
        labeled_until = t - label_delay_days  # the last day whose labels have arrived by the end of day t
        visible = [{"estimated": w["estimated"], **({"realized": w["realized_later"]} if w["day"] <= labeled_until else {})}
                   for w in windows]
        new_rows = sum(d.rows for d in days[champion.last + 1 : labeled_until + 1])
        since = max(trained_at, last_launch) if age_from_launch and last_launch is not None else trained_at
        decision = decide_retrain(policy_spec, drift_fired=drift["action"] == "retrain", drift_reason=record["drift_reason"],
                                  windows=visible, reference=champion.calibration["reference"], new_labeled_rows=new_rows,
                                  champion_age_days=float(t - since))
        if since != trained_at:  # a cron's age counts from its last launch, which the gate may not have promoted
            decision.reason = decision.reason.replace("the champion was trained", "the last retrain was launched")
        record.update(signal=decision.signal, fired=decision.fired, reason=decision.reason)
        cooling = decision.launch and last_launch is not None and t - last_launch < cooldown_days
        if cooling and last_launch is not None:
            record["reason"] = decision.reason.replace(
                "retrain launched", f"in cooldown (last retrain {t - last_launch} day(s) ago < cooldown {cooldown_days}); skipped")
        if not decision.launch or cooling:
            if drift["action"] == "retrain":
                drift_state["streak"] = drift["streak"]  # not retrained: the drift streak keeps counting
            continue
        last = labeled_until
        first = max(0, last - window_days + 1) if window_days > 0 else 0
        challenger = fit(first, last)
        champion_score = score(spec.evaluation.metric, challenger.holdout[spec.target].to_numpy(),
                               champion.predictor.predict(challenger.holdout))
        promoted, gate_reason = gate(challenger.holdout_score, champion_score, spec.evaluation)
        if challenger is champion:
            promoted, gate_reason = False, "challenger is already the champion (same training days)"
        record["launch"] = True
        last_launch = t
        result.retrains.append(RetrainEvent(
            day.key, t, decision.signal, decision.fired, decision.reason, challenger.name,
            f"{days[first].key}..{days[last].key}", challenger.rows, challenger.seconds, promoted, gate_reason))
        if promoted:
            champion, trained_at, windows, drift_state = challenger, t, [], {}
    return result


def run_backtest(spec: PipelineSpec, days: list[Day], *, policy: RetrainSpec | None = None, policy_label: str | None = None,
                 train_days: int = 7, label_delay_days: int = 1, cooldown_days: int = 1, every: int = 7,
                 window_days: int | None = None, drift_from: str | None = None) -> BacktestResult:
    """Replay ``days`` under the spec's retrain policy (or ``policy``), never-retrain and retrain-every-``every``-days."""
    if spec.task != "classification":
        raise ValueError(f"{spec.name}: a backtest judges performance from labels and scores; task {spec.task!r} is not "
                         "classification")
    if train_days < 1 or len(days) <= train_days:
        raise ValueError(f"{spec.name}: {len(days)} day(s) leave nothing to replay after the first {train_days} training day(s)")
    if label_delay_days < 0 or cooldown_days < 0 or every < 1:
        raise ValueError(f"{spec.name}: label_delay_days and cooldown_days must be >= 0 and every >= 1")
    started = time.perf_counter()
    retrain = policy or spec.retrain
    signals = spec.model_copy(update={"retrain": retrain}).retrain_signals
    window = train_days if window_days is None else window_days
    fit = _Trainer(spec, days)
    initial = fit(0, train_days - 1)
    schedule = RetrainSpec(signals=["schedule"], metric=retrain.metric, schedule_days=every, min_new_rows=0)

    def replay(name: str, label: str, policy: RetrainSpec | None, age_from_launch: bool = False) -> PolicyResult:
        return _replay(spec, days, initial, fit, name, label, retrain=policy, train_days=train_days, label_delay_days=label_delay_days,
                       cooldown_days=cooldown_days, window_days=window, age_from_launch=age_from_launch)

    policies = [
        replay(SPEC_POLICY, policy_label or f"spec ({', '.join(signals)})", retrain),
        replay(NEVER, "never retrain", None),
        replay(EVERY, f"every {every} days", schedule, age_from_launch=True),
    ]
    return BacktestResult(
        pipeline=spec.name, metric=retrain.metric, days=[d.key for d in days], rows=sum(d.rows for d in days),
        train_days=train_days, label_delay_days=label_delay_days, cooldown_days=cooldown_days, every=every, window_days=window,
        policy=retrain.model_dump(mode="json") | {"signals": signals}, initial={"rows": initial.rows, "seconds": initial.seconds,
                                                           "reference": initial.calibration["reference"]},
        policies=policies, drift_from=drift_from, seconds=time.perf_counter() - started)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary_lines(result: BacktestResult) -> list[str]:
    """One line per policy: retrains, training seconds, mean realized metric (after the drift day too, when known)."""
    lines = []
    for p in result.policies:
        after = f", after drift {_fmt(p.mean_realized(since=result.drift_from))}" if result.drift_from else ""
        promoted = sum(r.promoted for r in p.retrains)
        lines.append(f"{p.label}: {p.trainings} retrain(s) ({promoted} promoted), {p.training_seconds:.1f} s training, "
                     f"mean {result.metric} {_fmt(p.mean_realized())}{after}")
    return lines


def render_markdown(result: BacktestResult, plot_name: str | None = None) -> str:
    """The report: settings, a summary per policy, every retrain with its signal and reason, the metric per day."""
    metric = result.metric
    window = f"the last {result.window_days} labeled day(s)" if result.window_days > 0 else "every labeled day so far"
    out = [
        f"# Backtest: {result.pipeline}",
        "",
        f"{len(result.days)} daily partitions ({result.days[0]} .. {result.days[-1]}, {result.rows} rows) replayed in time order "
        "without Dagster, MLflow or BentoML: nothing was registered or launched.",
        "",
        f"- first model: trained on the first {result.train_days} day(s), taken as labeled history ({result.initial['rows']} rows, "
        f"{result.initial['seconds']:.1f} s); holdout {metric} {_fmt(result.initial['reference'].get(metric))}",
        f"- labels arrive {result.label_delay_days} day(s) after their day; only labeled rows count toward min_new_rows and "
        "are trained on",
        f"- a retrain trains on {window}; the gate (evaluation.min_improvement) decides whether it serves; at most one retrain "
        f"per {result.cooldown_days} day(s)",
        f"- {result.policies[0].label}: {', '.join(f'{k}={v}' for k, v in result.policy.items())}",
    ]
    if result.drift_from:
        out.append(f"- drift starts on {result.drift_from}")
    out += ["", "## Summary", ""]
    after = f" | mean {metric} from {result.drift_from}" if result.drift_from else ""
    before = f" | mean {metric} before {result.drift_from}" if result.drift_from else ""
    out += [f"| policy | retrains | promoted | training seconds | mean {metric}{before}{after} |",
            "|---|---:|---:|---:|---:|" + ("---:|" * (2 if result.drift_from else 0))]
    for p in result.policies:
        cells = [p.label, str(p.trainings), str(sum(r.promoted for r in p.retrains)), f"{p.training_seconds:.1f}",
                 _fmt(p.mean_realized())]
        if result.drift_from:
            cells += [_fmt(p.mean_realized(until=result.drift_from)), _fmt(p.mean_realized(since=result.drift_from))]
        out.append("| " + " | ".join(cells) + " |")
    if plot_name:
        out += ["", f"![realized {metric} per day]({plot_name})"]
    out += ["", "## Retrains", "", "A retrain launched at the end of a day serves from the next day when the gate promotes it.", "",
            "| policy | day | signal | fired | reason | trained on | rows | seconds | gate |", "|---|---|---|---|---|---|---:|---:|---|"]
    for p in result.policies:
        for r in p.retrains:
            gate = ("promoted: " if r.promoted else "kept champion: ") + r.gate_reason
            out.append(f"| {p.label} | {r.day} | {r.signal or '-'} | {', '.join(r.fired) or '-'} | {_cell(r.reason)} | "
                       f"{r.train_days} | {r.rows} | {r.seconds:.2f} | {_cell(gate)} |")
    if not any(p.retrains for p in result.policies):
        out.append("| (none) | | | | | | | | |")
    spec_policy = result.policy_result(SPEC_POLICY)
    out += ["", f"## Realized {metric} per day", "",
            "| day | " + " | ".join(p.label for p in result.policies) + " | drift (spec policy's champion) | spec policy's decision |",
            "|---|" + "---:|" * len(result.policies) + "---|---|"]
    for i, row in enumerate(spec_policy.days):
        values = []
        for p in result.policies:
            d = p.days[i]
            values.append(_fmt(d["realized"]) + (" ↻" if d["launch"] else ""))
        out.append(f"| {row['day']} | " + " | ".join(values) + f" | {row['drift']} | {_cell(row['reason'])} |")
    out += ["", "↻: a retrain was launched at the end of that day.", ""]
    return "\n".join(out)


def plot(result: BacktestResult, path: Path) -> Path:
    """A PNG of the realized metric per day under each policy, a marker where each retrained, the drift day dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.8), dpi=110)
    try:
        styles = {SPEC_POLICY: ("tab:blue", "-", 2.4, 3), NEVER: ("tab:gray", "--", 1.4, 1), EVERY: ("tab:orange", ":", 1.8, 2)}
        keys = result.policies[0].days
        x = list(range(len(keys)))
        for p in result.policies:
            color, line, width, order = styles.get(p.name, ("tab:green", "-", 1.5, 1))
            y = [math.nan if v is None else v for v in p.realized()]
            ax.plot(x, y, marker=".", color=color, linestyle=line, linewidth=width, zorder=order, label=p.label)
            marks = [i for i, d in enumerate(p.days) if d["launch"]]
            ax.scatter(marks, [y[i] for i in marks], marker="^", s=90, color=color, edgecolors="black", zorder=4 + order)
        if result.drift_from and result.drift_from in [d["day"] for d in keys]:
            at = [d["day"] for d in keys].index(result.drift_from)
            ax.axvline(at - 0.5, linestyle="--", color="tab:red", label=f"drift from {result.drift_from}")
        step = max(1, math.ceil(len(keys) / 12))
        ax.set_xticks(x[::step], [d["day"][5:] for d in keys][::step], rotation=45, ha="right")
        ax.set_xlabel("day (▲: retrain launched at the end of the day)")
        ax.set_ylabel(f"realized {result.metric}")
        ax.set_title(f"{result.pipeline}: realized {result.metric} per day under three retrain policies")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
