"""kiln.preflight without Dagster: specs that validate field by field but would fail at materialization are refused,
each error naming the file and the field; the shipped specs pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from kiln.features import compute_features
from kiln.preflight import check_specs, empty_frame
from kiln.spec import load_spec, load_specs, spec_files
from tests.conftest import REPO

PIPELINES = REPO / "platform_defs" / "pipelines"


def base() -> dict[str, Any]:
    return {
        "name": "orders", "source": {"path": "orders", "format": "parquet", "timestamp_column": "ts"},
        "target": "label", "task": "classification",
        "features": {"passthrough": ["amount"], "categorical": ["segment"], "expressions": {"log_amount": "LN(amount + 1)"}},
        "schema": {
            "order_id": {"dtype": "str", "key": True},
            "ts": {"dtype": "datetime"},
            "amount": {"dtype": "float"},
            "segment": {"dtype": "str", "allowed": ["a", "b"]},
            "label": {"dtype": "int"},
        },
        "serving": {"port": 3950},
    }


def check(tmp_path: Path, *changes: dict[str, Any]) -> tuple[Path, list[str]]:
    """Write one spec per change set (merged over base(), top-level fields replaced) and preflight them together."""
    paths = []
    for i, change in enumerate(changes):
        data = base() | {"name": f"orders{i}", "serving": {"port": 3950 + i}} | change
        path = tmp_path / f"orders{i}.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        paths.append(path)
    return paths[0], check_specs((load_spec(p), p) for p in paths)


def features(**change: Any) -> dict[str, Any]:
    return {"features": base()["features"] | change}


def test_shipped_specs_pass() -> None:
    specs = {s.name: s for s in load_specs(PIPELINES)}
    files = spec_files(PIPELINES)
    assert len(files) == len(specs) >= 2
    assert check_specs((specs[p.parent.name], p) for p in files) == []


def test_a_good_spec_passes_and_its_empty_frame_computes(tmp_path: Path) -> None:
    path, errors = check(tmp_path, {})
    assert errors == []
    spec = load_spec(path)
    frame = empty_frame(spec)
    assert frame.schema["ts"] == pl.Datetime("us") and frame.height == 0
    assert compute_features(frame, spec).columns == spec.feature_names  # what preflight stands for: the real path runs too


@pytest.mark.parametrize(("expression", "says"), [
    ("LN(amont + 1)", 'unable to find column "amont"'),         # a typo: the run would fail on the first partition
    ("EXTRACT(HOUR FROM amount)", "not supported for dtype"),  # a type error
    ("amount +", "unable to parse"),                           # not SQL
    ("UPPER(segment)", "gives String, not a number"),          # text where a number is needed
])
def test_a_feature_expression_that_would_not_compute(tmp_path: Path, expression: str, says: str) -> None:
    path, errors = check(tmp_path, features(expressions={"log_amount": expression}))
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}: features.expressions.log_amount: '{expression}'") and says in errors[0]


def test_features_function_and_simulator_must_import_and_be_callable(tmp_path: Path) -> None:
    path, errors = check(tmp_path, features(function="nowhere.at_all:make") | {
        "source": base()["source"] | {"simulator": "kiln.preflight:PIPELINES_NOT_HERE"}})
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"{path}: features.function: feature function cannot load 'nowhere.at_all:make'")
    assert errors[1].startswith(f"{path}: source.simulator: simulator cannot load")
    _, errors = check(tmp_path, features(function="kiln.preflight:_POLARS_DTYPES"))
    assert errors == [f"{path}: features.function: 'kiln.preflight:_POLARS_DTYPES' is a dict, not a function"]
    _, errors = check(tmp_path, features(function="kiln.features:data_version") | {
        "source": base()["source"] | {"simulator": "platform_defs.simulators.fraud:generate_day"}})
    assert errors == []


def test_features_that_collide_with_key_timestamp_or_target(tmp_path: Path) -> None:
    path, errors = check(tmp_path, features(passthrough=["amount", "order_id"], expressions={"ts": "LN(amount + 1)"}))
    assert errors == [
        f"{path}: features.passthrough: 'order_id' is a key column; it is kept beside the features, so it cannot be one "
        "(remove it, or rename the expression)",
        f"{path}: features.expressions.ts: 'ts' is source.timestamp_column; it is kept beside the features, so it cannot be one "
        "(remove it, or rename the expression)",
        f"{path}: features.passthrough: 'order_id' is a str column; pass-through features are numbers "
        "(list it under features.categorical with schema.order_id.allowed)",
    ]


def test_a_start_date_that_is_not_on_the_calendar(tmp_path: Path) -> None:
    path, errors = check(tmp_path, {"source": base()["source"] | {"start_date": "2026-02-30", "partitions": "daily"}})
    assert len(errors) == 1 and errors[0].startswith(f"{path}: source.start_date: '2026-02-30' is not a calendar date")


def test_serving_ports_are_unique_across_pipelines(tmp_path: Path) -> None:
    _, errors = check(tmp_path, {}, {}, {"serving": {"port": 3950}})
    first, third = tmp_path / "orders0.yaml", tmp_path / "orders2.yaml"
    why = (f"serving.port: 3950 is used by 2 pipelines: orders0 ({first}), orders2 ({third}); each endpoint needs its own port "
           "(a missing serving block means 3000)")
    assert errors == [f"{first}: {why}", f"{third}: {why}"]  # orders1 (3951) is fine
    _, errors = check(tmp_path, {"serving": {}}, {"serving": {}})  # both default to 3000
    assert len(errors) == 2 and all("serving.port: 3000 is used by 2 pipelines" in e for e in errors)
