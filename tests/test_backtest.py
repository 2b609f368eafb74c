"""`kiln backtest`: daily partitions replayed under three retrain policies, on simulated fraud data that drifts mid-way."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import pytest

from kiln.backtest import EVERY, NEVER, SPEC_POLICY, BacktestResult, read_days, render_markdown, run_backtest, train_model
from kiln.spec import PipelineSpec, load_spec
from platform_defs.simulators.fraud import generate_day
from tests.conftest import FRAUD_SPEC

DAYS, DRIFT_FROM, ROWS, TRAIN_DAYS, EVERY_DAYS = 20, 10, 3000, 5, 5
START = date(2026, 1, 1)


@pytest.fixture(scope="module")
def spec() -> PipelineSpec:
    data = load_spec(FRAUD_SPEC).model_dump(mode="json", by_alias=True)
    data["trainer"]["params"]["num_boost_round"] = 80  # a smaller model: the replay trains several times
    data["retrain"] = {"signals": ["drift", "estimated_performance"], "min_new_rows": 1000}
    return PipelineSpec.model_validate(data)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 days of transactions: no drift for the first 10, then covariate and concept drift (0.8)."""
    folder = tmp_path_factory.mktemp("fraud-source")
    for i in range(DAYS):
        day = START + timedelta(days=i)
        generate_day(day, ROWS, 3, 0.8 if i >= DRIFT_FROM else 0.0).write_parquet(folder / f"{day.isoformat()}.parquet")
    (folder / "notes.txt").write_text("not a partition")  # ignored: the same listing rules as the new-data sensor
    return folder


@pytest.fixture(scope="module")
def result(spec: PipelineSpec, source: Path) -> BacktestResult:
    days = read_days(spec, source)
    return run_backtest(spec, days, train_days=TRAIN_DAYS, every=EVERY_DAYS, drift_from=days[DRIFT_FROM].key)


def test_the_policy_retrains_after_the_drift_day_and_never_before(result: BacktestResult) -> None:
    drift_day = (START + timedelta(days=DRIFT_FROM)).isoformat()
    assert result.drift_from == drift_day
    policy = result.policy_result(SPEC_POLICY)
    assert policy.retrains, "the spec's policy never retrained after the drift"
    assert all(r.day >= drift_day for r in policy.retrains), [r.day for r in policy.retrains]
    for r in policy.retrains:
        assert r.signal in r.fired and r.signal in ("drift", "estimated_performance")
        assert r.reason.endswith("retrain launched") and r.rows == TRAIN_DAYS * ROWS
    # no signal fired on a clean day: every decision before the drift says so
    before = [d for d in policy.days if d["day"] < drift_day]
    assert before and all(d["reason"].startswith("no retrain signal fired") for d in before)


def test_never_retrain_never_retrains_and_the_schedule_is_a_cron(result: BacktestResult) -> None:
    never = result.policy_result(NEVER)
    assert never.trainings == 0 and never.training_seconds == 0
    assert {d["model"] for d in never.days} == {"m0"}
    every = result.policy_result(EVERY)
    # the first model is trained at the end of day index 4; a launch every 5 days: the ends of days 9, 14 and 19
    assert [r.day_index for r in every.retrains] == [9, 14, 19]
    assert all(r.signal == "schedule" for r in every.retrains)


def test_policies_agree_until_the_first_retrain_and_the_metric_is_the_days_auc(spec: PipelineSpec, source: Path,
                                                                             result: BacktestResult) -> None:
    from sklearn.metrics import roc_auc_score

    first = min(r.day_index for p in result.policies for r in p.retrains)
    for i in range(first - TRAIN_DAYS + 1):  # days served by the first model under every policy
        assert len({p.days[i]["realized"] for p in result.policies}) == 1
    days = read_days(spec, source)
    model = train_model(spec, days, 0, TRAIN_DAYS - 1, "check")
    never = result.policy_result(NEVER)
    for offset in (0, DAYS - TRAIN_DAYS - 1):  # the first replayed day and the last
        day = days[TRAIN_DAYS + offset]
        exact = roc_auc_score(day.features[spec.target].to_numpy(), model.predictor.predict(day.features))
        assert never.days[offset]["day"] == day.key
        assert never.days[offset]["realized"] == pytest.approx(exact, abs=0.01)  # binned AUC: ties inside a bin count 1/2


def test_retraining_on_signals_beats_never_retraining_after_the_drift(result: BacktestResult) -> None:
    policy = result.policy_result(SPEC_POLICY).mean_realized(since=result.drift_from)
    never = result.policy_result(NEVER).mean_realized(since=result.drift_from)
    assert policy is not None and never is not None
    assert policy > never + 0.02, (policy, never)


def test_the_report_names_the_signal_and_reason_of_each_retrain(result: BacktestResult) -> None:
    markdown = render_markdown(result, "plot.png")
    assert "![realized roc_auc per day](plot.png)" in markdown
    retrains = [(p, r) for p in result.policies for r in p.retrains]
    assert retrains
    for policy, r in retrains:
        assert f"| {policy.label} | {r.day} | {r.signal} | {', '.join(r.fired)} | {r.reason} |" in markdown
    for policy in result.policies:
        assert f"| {policy.label} | {policy.trainings} |" in markdown


def test_cli_writes_the_markdown_and_the_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from platform_defs.cli import main

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    policy = tmp_path / "every3.yaml"
    policy.write_text("retrain:\n  signals: [schedule]\n  schedule_days: 3\n  min_new_rows: 0\n")
    code = main(["backtest", "fraud", "--simulate", "12", "--drift-from", "6", "--rows", "2000", "--to", "2026-01-11",
                 "--train-days", "4", "--every", "4", "--policy", str(policy)])
    out = capsys.readouterr().out
    assert code == 0, out
    reports = tmp_path / "reports"
    [md] = sorted(reports.glob("backtest-fraud-*.md"))
    [png] = sorted(reports.glob("backtest-fraud-*.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert f"wrote {md}" in out and f"wrote {png}" in out
    assert "11 daily partitions (2026-01-01 .. 2026-01-11" in text and f"]({png.name})" in text
    # the policy file's schedule replaced the spec's signals: a launch 3 days after the first model (end of day index 6)
    assert "| policy every3.yaml | 2026-01-07 | schedule | schedule |" in text
    assert "drift starts on 2026-01-07" in text and "\n  policy every3.yaml: 3 retrain(s) (1 promoted)" in out
    assert "\n  every 4 days: 1 retrain(s) (0 promoted)" in out


def test_cli_rejects_a_bad_policy_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from platform_defs.cli import main

    policy = tmp_path / "bad.yaml"
    policy.write_text("retrain:\n  signals: [vibes]\n")
    assert main(["backtest", "fraud", "--simulate", "3", "--policy", str(policy)]) == 1
    err = capsys.readouterr().err
    assert f"{policy}: retrain.signals.0:" in err and "vibes" in err


def test_cooldown_allows_one_retrain_per_cooldown_days(spec: PipelineSpec, source: Path) -> None:
    days = read_days(spec, source, end=(START + timedelta(days=15)).isoformat())
    assert len(days) == 16
    policy = run_backtest(spec, days, train_days=TRAIN_DAYS, every=EVERY_DAYS, cooldown_days=3).policy_result(SPEC_POLICY)
    launches = [r.day_index for r in policy.retrains]
    assert launches and all(b - a >= 3 for a, b in zip(launches, launches[1:], strict=False)), launches
    skipped = [d for d in policy.days if "in cooldown" in d["reason"]]
    assert skipped and all(not d["launch"] and d["reason"].endswith("< cooldown 3); skipped") for d in skipped)
