"""The route table of a release (kiln/release.py): weights, mirror, edge shares and errors, without Dagster."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.release import Backend, ReleaseError, RouteTable, canary_weight, route_table
from kiln.spec import PipelineSpec, spec_data
from tests.conftest import FRAUD_SPEC


def _spec(mode: str = "none", share: float = 0.1) -> PipelineSpec:
    data: dict[str, Any] = spec_data(FRAUD_SPEC)
    data.setdefault("serving", {})["release"] = {"mode": mode, "challenger_share": share}
    return PipelineSpec.model_validate(data)


def test_none_serves_the_champion_alone_even_with_a_challenger() -> None:
    table = route_table(_spec("none"), "7", "8")
    assert table == RouteTable("fraud", "none", (Backend("fraud-v7", "champion", "7", 100),))
    assert table.mirror is None and table.versions == ("7",) and table.weights() == {"7": 100}


@pytest.mark.parametrize("mode", ["none", "canary", "shadow"])
def test_no_challenger_serves_the_champion_alone(mode: str) -> None:
    table = route_table(_spec(mode, 0.5), "3", None)
    assert table.backends == (Backend("fraud-v3", "champion", "3", 100),) and table.mirror is None


@pytest.mark.parametrize(("share", "champion", "challenger"), [
    (0.1, 90, 10), (0.25, 75, 25), (0.5, 50, 50), (0.9, 10, 90),
    (0.125, 87, 13),   # half up (Python's round() would give 12)
    (0.145, 85, 15),   # 0.145 * 100 is 14.499999999999998 in floats; the share as written rounds half up
    (0.004, 99, 1),    # a positive share never rounds to nothing
    (0.996, 1, 99),    # and the champion keeps some traffic below a share of 1
])
def test_canary_splits_integer_weights_that_sum_to_100(share: float, champion: int, challenger: int) -> None:
    table = route_table(_spec("canary", share), "7", "8")
    assert table.backends == (Backend("fraud-v7", "champion", "7", champion), Backend("fraud-v8", "challenger", "8", challenger))
    assert sum(b.weight for b in table.backends) == 100 and table.mirror is None


def test_canary_share_0_is_the_champion_alone_and_share_1_keeps_the_champion_at_weight_0() -> None:
    assert route_table(_spec("canary", 0.0), "7", "8").backends == (Backend("fraud-v7", "champion", "7", 100),)
    full = route_table(_spec("canary", 1.0), "7", "8")
    assert full.weights() == {"7": 0, "8": 100}
    assert full.champion == Backend("fraud-v7", "champion", "7", 0)  # still deployed: traffic can go back at once


def test_shadow_mirrors_to_the_challenger_and_never_serves_it() -> None:
    table = route_table(_spec("shadow", 0.3), "7", "8")
    assert table.backends == (Backend("fraud-v7", "champion", "7", 100),)
    assert table.mirror == Backend("fraud-v8", "challenger", "8", 0)
    assert table.versions == ("7", "8") and table.weights() == {"7": 100}


def test_integer_versions_are_accepted_as_their_text() -> None:
    assert route_table(_spec("canary", 0.2), 7, 12).weights() == {"7": 80, "12": 20}  # type: ignore[arg-type]


def test_errors_name_the_pipeline_and_the_reason() -> None:
    with pytest.raises(ReleaseError, match=r"fraud: release: the challenger is the champion \(version 7\)"):
        route_table(_spec("canary"), "7", "7")
    with pytest.raises(ReleaseError, match=r"fraud: release: champion version 'V7_x' must match"):
        route_table(_spec("canary"), "V7_x", "8")
    with pytest.raises(ReleaseError, match=r"fraud: release: challenger version '' must match"):
        route_table(_spec("canary"), "7", "")
    with pytest.raises(ReleaseError, match=r"challenger_share: 1.5 is not in \[0, 1\]"):
        canary_weight(1.5)
