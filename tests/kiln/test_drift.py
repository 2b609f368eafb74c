"""Unit tests for the pure drift math in kiln.drift."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import numpy as np
import polars as pl
import pytest

from kiln.drift import (
    bin_counts,
    build_reference,
    column_scores,
    decide,
    jensen_shannon,
    merge_counts,
    psi,
)

POLICY: dict[str, Any] = {
    "threshold": 0.2,
    "min_samples": 500,
    "consecutive_windows": 2,
    "cooldown_seconds": 3600.0,
    "drifted_feature_share": 0.25,
}
FEATURES = [f"f{i:02d}" for i in range(20)]


def _scores(drifted: list[str], extra: dict[str, float] | None = None) -> dict[str, float]:
    """Scores for the 20 FEATURES: 0.5 for the named ones, 0.01 for the rest."""
    scores = {f: (0.5 if f in drifted else 0.01) for f in FEATURES}
    scores.update(extra or {})
    return scores


def _frame(rng: np.random.Generator, n: int, shift: float = 0.0) -> pl.DataFrame:
    """A mixed-type frame: a normal float, a bool, a small-int and a string column with nulls."""
    return pl.DataFrame(
        {
            "x": rng.normal(shift, 1.0, n),
            "flag": rng.random(n) < 0.3,
            "level": rng.integers(0, 5, n),
            "color": rng.choice(np.array(["red", "green", "blue", "mauve"], dtype=object), n),
        }
    )


# --- psi / jensen_shannon -------------------------------------------------------------------------------------------


def test_psi_of_identical_distributions_is_zero_counts_or_proportions() -> None:
    assert psi([10, 20, 30, 40], [10, 20, 30, 40]) == pytest.approx(0.0, abs=1e-12)
    assert psi([10, 20, 30, 40], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.0, abs=1e-12)


def test_psi_matches_hand_computed_value() -> None:
    expected = 0.25 * math.log(2.0) + 0.25 * math.log(1.5)  # (0.25-0.5)ln(0.5) + (0.75-0.5)ln(1.5)
    assert psi([50, 50], [25, 75]) == pytest.approx(expected, rel=1e-12)
    assert psi([25, 75], [50, 50]) == pytest.approx(expected, rel=1e-12)  # PSI is symmetric


def test_psi_floors_empty_bins_at_eps() -> None:
    eps = 1e-4
    expected = (0.5 - 1.0) * math.log(0.5 / 1.0) + (0.5 - eps) * math.log(0.5 / eps)
    assert psi([1, 0], [1, 1], eps=eps) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("expected", "actual"),
    [([1, 2], [1, 2, 3]), ([0, 0], [1, 1]), ([1, 1], [0, 0]), ([1, -1], [1, 1]), ([], [])],
)
def test_psi_and_js_reject_malformed_input(expected: list[float], actual: list[float]) -> None:
    with pytest.raises(ValueError):
        psi(expected, actual)
    with pytest.raises(ValueError):
        jensen_shannon(expected, actual)


def test_one_sd_mean_shift_scores_well_above_threshold_and_same_distribution_does_not() -> None:
    rng = np.random.default_rng(7)
    reference = build_reference(pl.DataFrame({"x": rng.normal(0, 1, 200_000)}), ["x"], {})
    shifted = bin_counts(pl.DataFrame({"x": rng.normal(1, 1, 200_000)}), reference)
    same = bin_counts(pl.DataFrame({"x": rng.normal(0, 1, 200_000)}), reference)

    # Continuous PSI of N(0,1) vs N(1,1) is the symmetric KL divergence = 1.0; ten decile bins lose a little of it.
    assert 0.8 < column_scores(reference, shifted)["x"] < 1.05
    assert column_scores(reference, same)["x"] < 0.01
    assert 0.12 < column_scores(reference, shifted, method="js")["x"] < 0.2
    assert column_scores(reference, same, method="js")["x"] < 0.002


def test_js_is_bounded_symmetric_and_matches_known_values() -> None:
    assert jensen_shannon([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint supports: the maximum
    assert jensen_shannon([3, 5, 2], [30, 50, 20]) == pytest.approx(0.0, abs=1e-12)
    # JS([1,0],[.5,.5]) = .5*log2(1/.75) + .5*(.5*log2(.5/.75) + .5*log2(.5/.25))
    known = 0.5 * math.log2(1 / 0.75) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
    assert jensen_shannon([1, 0], [1, 1]) == pytest.approx(known, rel=1e-12)

    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.random(8) * (rng.random(8) < 0.7)  # some empty bins
        q = rng.random(8) * (rng.random(8) < 0.7)
        if p.sum() == 0 or q.sum() == 0:
            continue
        value = jensen_shannon(p.tolist(), q.tolist())
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(jensen_shannon(q.tolist(), p.tolist()), abs=1e-12)


# --- build_reference / bin_counts / merge_counts ---------------------------------------------------------------------


def test_build_reference_numeric_bins_hold_equal_shares_and_profile_is_json() -> None:
    rng = np.random.default_rng(1)
    df = _frame(rng, 100_000)
    reference = build_reference(df, ["x", "flag", "level"], {"color": ["red", "green", "blue"]}, bins=10)

    assert reference["version"] == 1
    assert reference["n"] == 100_000
    x = reference["numeric"]["x"]
    assert len(x["edges"]) == 9
    assert x["edges"] == sorted(x["edges"])
    assert len(x["counts"]) == 11  # 10 value bins + null bin
    assert x["counts"][-1] == 0
    shares = np.array(x["counts"][:-1]) / 100_000
    assert np.all(np.abs(shares - 0.1) < 0.002), shares
    assert json.loads(json.dumps(reference)) == reference  # plain JSON types only, no numpy scalars


def test_build_reference_dedupes_edges_for_bool_and_int_columns() -> None:
    df = pl.DataFrame({"flag": [True] * 30 + [False] * 70, "level": list(range(5)) * 20})
    reference = build_reference(df, ["flag", "level"], {})

    flag = reference["numeric"]["flag"]
    assert flag["edges"] == [0.0, 1.0]
    assert flag["counts"] == [0, 70, 30, 0]  # (-inf,0), [0,1), [1,inf), null
    level = reference["numeric"]["level"]
    assert level["edges"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert level["counts"] == [0, 20, 20, 20, 20, 20, 0]


def test_nulls_nan_and_unseen_categories_land_in_null_and_other_bins() -> None:
    train = pl.DataFrame({"x": [float(i) for i in range(100)], "color": ["red", "green"] * 50})
    reference = build_reference(train, ["x"], {"color": ["red", "green", "blue"]}, bins=4)
    assert reference["categorical"]["color"] == {"categories": ["red", "green", "blue"], "counts": [50, 50, 0, 0, 0]}

    window = pl.DataFrame(
        {
            "x": [None, float("nan"), -1e9, 1e9, 50.0, None],
            "color": pl.Series(["red", "purple", None, "purple", "blue", "teal"], dtype=pl.Categorical),
        }
    )
    counts = bin_counts(window, reference)
    assert counts["n"] == 6
    assert counts["numeric"]["x"] == [1, 0, 1, 1, 3]  # -1e9 low, 50 in [49, 74), 1e9 high; null + NaN
    assert counts["categorical"]["color"] == [1, 0, 1, 3, 1]  # red, green, blue, other=purple x2 + teal, null


def test_missing_column_raises_key_error_naming_it() -> None:
    df = pl.DataFrame({"x": [1.0, 2.0], "color": ["a", "b"]})
    with pytest.raises(KeyError, match="amount"):
        build_reference(df, ["x", "amount"], {})
    with pytest.raises(KeyError, match="country"):
        build_reference(df, ["x"], {"country": ["de"]})
    reference = build_reference(df, ["x"], {"color": ["a"]})
    with pytest.raises(KeyError, match="color"):
        bin_counts(df.drop("color"), reference)


def test_non_numeric_column_listed_as_numeric_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="color"):
        build_reference(pl.DataFrame({"color": ["a", "b"]}), ["color"], {})


def test_merge_counts_of_two_windows_equals_counts_of_their_concatenation() -> None:
    rng = np.random.default_rng(2)
    reference = build_reference(_frame(rng, 20_000), ["x", "flag", "level"], {"color": ["red", "green", "blue"]})
    first = _frame(rng, 7_000, shift=0.5).with_columns(
        pl.when(pl.col("level") == 3).then(None).otherwise(pl.col("x")).alias("x")
    )
    second = _frame(rng, 4_000, shift=-0.3)

    merged = merge_counts(bin_counts(first, reference), bin_counts(second, reference))
    assert merged == bin_counts(pl.concat([first, second]), reference)
    assert merged["n"] == 11_000
    assert merged["numeric"]["x"][-1] > 0  # the nulls were carried through the merge


def test_merge_counts_rejects_windows_binned_differently() -> None:
    a = {"n": 2, "numeric": {"x": [1, 1]}, "categorical": {}}
    with pytest.raises(ValueError, match="x"):
        merge_counts(a, {"n": 3, "numeric": {"x": [1, 1, 1]}, "categorical": {}})
    with pytest.raises(ValueError, match="y"):
        merge_counts(a, {"n": 2, "numeric": {"x": [1, 1], "y": [2]}, "categorical": {}})


def test_column_scores_covers_every_reference_column_and_flags_only_the_shifted_one() -> None:
    rng = np.random.default_rng(3)
    reference = build_reference(_frame(rng, 50_000), ["x", "flag", "level"], {"color": ["red", "green", "blue"]})
    window = _frame(rng, 50_000).with_columns(pl.col("x") + 1.0)

    scores = column_scores(reference, bin_counts(window, reference))
    assert set(scores) == {"x", "flag", "level", "color"}
    assert scores["x"] > 0.5
    assert max(scores[c] for c in ("flag", "level", "color")) < 0.01
    with pytest.raises(ValueError, match="kl"):
        column_scores(reference, bin_counts(window, reference), method="kl")


def test_column_scores_of_an_empty_window_are_zero_not_an_error() -> None:
    reference = build_reference(pl.DataFrame({"x": [1.0, 2.0, 3.0]}), ["x"], {})
    empty = bin_counts(pl.DataFrame({"x": []}, schema={"x": pl.Float64}), reference)
    assert empty["numeric"]["x"] == [0] * len(reference["numeric"]["x"]["counts"])
    assert column_scores(reference, empty) == {"x": 0.0}


# --- decide ----------------------------------------------------------------------------------------------------------


def test_decide_too_few_samples_is_insufficient_and_keeps_the_streak() -> None:
    decision, state = decide(_scores(FEATURES), 499, {"streak": 1, "last_retrain_at": None}, 10.0, **POLICY)
    assert decision["action"] == "insufficient"
    assert decision["drifted"] is False
    assert decision["streak"] == 1
    assert state == {"streak": 1, "last_retrain_at": None}


def test_decide_hysteresis_waits_for_consecutive_drifted_windows() -> None:
    drifted = _scores(FEATURES[:10])
    first, state = decide(drifted, 1_000, {}, 100.0, **POLICY)
    assert (first["action"], first["drifted"], first["streak"]) == ("wait", True, 1)
    assert state == {"streak": 1, "last_retrain_at": None}

    second, state = decide(drifted, 1_000, state, 200.0, **POLICY)
    assert second["action"] == "retrain"
    assert second["streak"] == 2
    assert state == {"streak": 0, "last_retrain_at": 200.0}


def test_decide_clean_window_resets_the_streak() -> None:
    _, state = decide(_scores(FEATURES[:10]), 1_000, {}, 100.0, **POLICY)
    clean, state = decide(_scores([]), 1_000, state, 200.0, **POLICY)
    assert (clean["action"], clean["drifted"], clean["streak"]) == ("ok", False, 0)
    assert state["streak"] == 0

    again, state = decide(_scores(FEATURES[:10]), 1_000, state, 300.0, **POLICY)
    assert again["action"] == "wait"  # the streak restarted, so one drifted window is not enough
    assert state["streak"] == 1


def test_decide_cooldown_blocks_retrain_then_allows_it_after_cooldown() -> None:
    drifted = _scores(FEATURES[:10])
    state: dict[str, Any] = {"streak": 0, "last_retrain_at": 1_000.0}

    first, state = decide(drifted, 1_000, state, 1_100.0, **POLICY)
    second, state = decide(drifted, 1_000, state, 1_200.0, **POLICY)
    assert (first["action"], second["action"]) == ("cooldown", "cooldown")
    assert second["streak"] == 2  # the streak keeps counting during cooldown
    assert state == {"streak": 2, "last_retrain_at": 1_000.0}

    after, state = decide(drifted, 1_000, state, 1_000.0 + 3_600.0, **POLICY)
    assert after["action"] == "retrain"
    assert state == {"streak": 0, "last_retrain_at": 4_600.0}


def test_decide_one_drifted_feature_out_of_twenty_does_not_trigger() -> None:
    decision, state = decide(_scores(["f03"]), 1_000, {"streak": 1}, 10.0, **{**POLICY, "consecutive_windows": 1})
    assert decision["action"] == "ok"
    assert decision["drifted"] is False
    assert decision["drifted_columns"] == ["f03"]
    assert decision["share"] == pytest.approx(0.05)
    assert decision["max_score"] == pytest.approx(0.5)
    assert state["streak"] == 0


def test_decide_share_rule_triggers_at_the_configured_share() -> None:
    below, _ = decide(_scores(FEATURES[:4]), 1_000, {}, 10.0, **{**POLICY, "consecutive_windows": 1})
    at, _ = decide(_scores(FEATURES[:5]), 1_000, {}, 10.0, **{**POLICY, "consecutive_windows": 1})
    assert (below["action"], below["share"]) == ("ok", pytest.approx(0.2))
    assert (at["action"], at["share"]) == ("retrain", pytest.approx(0.25))
    assert at["drifted_columns"] == FEATURES[:5]


def test_decide_prediction_score_drift_alone_triggers() -> None:
    scores = _scores([], {"prediction": 0.9})
    policy = {**POLICY, "consecutive_windows": 1}

    decision, state = decide(scores, 1_000, {}, 50.0, score_key="prediction", **policy)
    assert decision["action"] == "retrain"
    assert decision["drifted_columns"] == ["prediction"]
    assert decision["share"] == 0.0  # the prediction column is not counted as a feature
    assert state == {"streak": 0, "last_retrain_at": 50.0}

    # Without score_key the same column is just one feature out of 21 and the multiple-testing guard holds.
    as_feature, _ = decide(scores, 1_000, {}, 50.0, **policy)
    assert as_feature["action"] == "ok"


def test_decide_does_not_mutate_input_state_and_returns_json() -> None:
    state = {"streak": 1, "last_retrain_at": None}
    snapshot = copy.deepcopy(state)
    decision, new_state = decide(_scores(FEATURES), 1_000, state, 99.0, **POLICY)
    assert decision["action"] == "retrain"
    assert state == snapshot
    assert new_state is not state
    assert json.loads(json.dumps([decision, new_state])) == [decision, new_state]
