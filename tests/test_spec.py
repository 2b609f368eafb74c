"""Pipeline specs: valid ones load, and every kind of mistake names the file, field and reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kiln.spec import PIPELINE_COMPONENT_TYPE, SpecError, load_spec, load_specs, spec_data, spec_files
from tests.conftest import REPO

PIPELINES = REPO / "platform_defs" / "pipelines"
FRAUD_SPEC = PIPELINES / "fraud" / "defs.yaml"  # the shipped component form: type + attributes


def write(folder: Path, name: str, data: dict | str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def fraud() -> dict:
    return spec_data(FRAUD_SPEC)


def write_component(folder: Path, name: str, text: str) -> Path:
    path = folder / name / "defs.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def line_of(text: str, fragment: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


def test_fraud_spec_loads_with_its_contract() -> None:
    spec = load_spec(FRAUD_SPEC)
    assert spec.name == "fraud"
    assert spec.target == "is_fraud" and "is_fraud" not in spec.input_columns
    assert spec.key_columns == ["txn_id"]
    assert spec.feature_names[:5] == ["amount", "card_present", "customer_age", "distance_from_home_km", "txns_last_24h"]
    assert spec.feature_names[-4:] == ["log_amount", "hour", "is_night", "amount_per_txn"]


def test_shipped_specs_are_component_instances() -> None:
    """Each shipped pipeline is `<name>/defs.yaml` with `type: platform_defs.component.KilnPipeline`, as `dg` expects."""
    files = spec_files(PIPELINES)
    assert [p.relative_to(PIPELINES).as_posix() for p in files] == ["breast_cancer/defs.yaml", "fraud/defs.yaml"]
    for path in files:
        raw = yaml.safe_load(path.read_text())
        assert raw["type"] == PIPELINE_COMPONENT_TYPE and raw["attributes"]["name"] == path.parent.name
    assert [s.name for s in load_specs(PIPELINES)] == ["breast_cancer", "fraud"]


def test_component_type_names_the_component_class() -> None:
    from platform_defs.component import KilnPipeline

    assert f"{KilnPipeline.__module__}.{KilnPipeline.__qualname__}" == PIPELINE_COMPONENT_TYPE


def test_component_form_error_names_file_field_and_line(tmp_path: Path) -> None:
    text = FRAUD_SPEC.read_text().replace("dtype: float, min: 0, max: 50000", "dtype: flaot, min: 0, max: 50000")
    path = write_component(tmp_path, "fraud", text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    line = line_of(text, "dtype: flaot")
    assert str(err.value) == (f"{path}: schema.amount.dtype: 'flaot' is not one of float, int, str, bool, datetime (line {line})")


def test_cross_field_error_names_the_field_and_its_line(tmp_path: Path) -> None:
    text = FRAUD_SPEC.read_text().replace("target: is_fraud", "target: is_chargeback")
    path = write_component(tmp_path, "fraud", text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value) == f"{path}: target: 'is_chargeback' is not a schema column (line {line_of(text, 'target: is_chargeback')})"


def test_component_folder_name_must_match(tmp_path: Path) -> None:
    path = write_component(tmp_path, "payments", FRAUD_SPEC.read_text())
    with pytest.raises(SpecError, match=r"payments/defs\.yaml: name: 'fraud' must equal the folder name 'payments'"):
        load_spec(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("type: dagster.FunctionComponent\nattributes: {name: fraud}\n",
         r"type: 'dagster.FunctionComponent' is not Kiln's pipeline component; write 'type: platform_defs\.component\.KilnPipeline' "
         r"\(line 1\)"),
        (f"type: {PIPELINE_COMPONENT_TYPE}\n", r"attributes: expected the pipeline spec as a mapping of fields, got nothing"),
        (f"type: {PIPELINE_COMPONENT_TYPE}\npost_processing: {{}}\nattributes: {{}}\n", r"post_processing: unknown field .* \(line 2\)"),
        ("name: fraud\n", r"type: required field is missing"),
    ],
)
def test_component_file_shape_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_spec(write_component(tmp_path, "fraud", text))


def test_folder_mixes_component_and_bare_specs(tmp_path: Path) -> None:
    """Older folders (KILN_PIPELINES_DIR) keep bare `<name>.yaml` specs; both forms load, and a name is used once."""
    write_component(tmp_path, "fraud", FRAUD_SPEC.read_text())
    write(tmp_path, "payments", fraud() | {"name": "payments"})
    assert [s.name for s in load_specs(tmp_path)] == ["fraud", "payments"]
    write(tmp_path, "fraud", fraud())
    with pytest.raises(SpecError, match="name: 'fraud' is used by 2 specs"):
        load_specs(tmp_path)


def test_spec_json_round_trip_keeps_feature_order() -> None:
    spec = load_spec(FRAUD_SPEC)
    again = type(spec).from_json(spec.to_json())
    assert again == spec and again.feature_names == spec.feature_names


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "broken", "name: broken\nschema: [unclosed\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(path) in str(err.value) and "line" in str(err.value) and "invalid YAML" in str(err.value)


def test_unknown_field_is_named(tmp_path: Path) -> None:
    data = fraud() | {"colour": "blue"}
    with pytest.raises(SpecError, match=r"fraud\.yaml: colour: unknown field"):
        load_spec(write(tmp_path, "fraud", data))


def test_bad_dtype_lists_the_choices(tmp_path: Path) -> None:
    data = fraud()
    data["schema"]["amount"]["dtype"] = "flaot"
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, "fraud", data))
    text = (tmp_path / "fraud.yaml").read_text()
    assert str(err.value) == (f"{tmp_path / 'fraud.yaml'}: schema.amount.dtype: 'flaot' is not one of float, int, str, bool, datetime "
                              f"(line {line_of(text, 'dtype: flaot')})")


@pytest.mark.parametrize("name", ["Fraud", "1fraud", "f", "fraud-detector", "x" * 42])
def test_bad_name_is_rejected(tmp_path: Path, name: str) -> None:
    data = fraud() | {"name": name}
    with pytest.raises(SpecError, match=r"name: '.*' must match"):
        load_spec(write(tmp_path, "spec", data))


def test_name_must_match_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="must equal the file name 'other'"):
        load_spec(write(tmp_path, "other", fraud()))


def test_duplicate_names_are_reported(tmp_path: Path) -> None:
    write(tmp_path, "fraud", fraud())
    (tmp_path / "fraud.yml").write_text(yaml.safe_dump(fraud()))
    with pytest.raises(SpecError, match="name: 'fraud' is used by 2 specs"):
        load_specs(tmp_path)


def test_cross_field_errors(tmp_path: Path) -> None:
    data = fraud()
    data["target"] = "nope"
    with pytest.raises(SpecError, match="target: 'nope' is not a schema column"):
        load_spec(write(tmp_path, "fraud", data))
    data = fraud()
    data["features"]["passthrough"].append("is_fraud")
    with pytest.raises(SpecError, match="the target 'is_fraud' cannot be a feature"):
        load_spec(write(tmp_path, "fraud", data))


def test_all_errors_are_reported_together(tmp_path: Path) -> None:
    good = fraud()
    write(tmp_path, "fraud", good)
    bad = fraud() | {"name": "second", "task": "clustering"}
    write(tmp_path, "second", bad)
    write(tmp_path, "third", "- a list\n")
    with pytest.raises(SpecError) as err:
        load_specs(tmp_path)
    text = str(err.value)
    assert "second.yaml: task: 'clustering' is not one of classification, regression" in text
    assert "third.yaml: (top level): expected a mapping" in text


def test_kiln_validate_cli(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "KILN_PIPELINES_DIR": str(tmp_path), "HOME": str(tmp_path)}
    write(tmp_path, "fraud", fraud())
    ok = subprocess.run([sys.executable, "-m", "platform_defs.cli", "validate"], cwd=REPO, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "ok  fraud" in ok.stdout
    data = fraud()
    data["schema"]["amount"]["dtype"] = "flaot"
    write(tmp_path, "fraud", data)
    bad = subprocess.run([sys.executable, "-m", "platform_defs.cli", "validate"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "schema.amount.dtype: 'flaot' is not one of" in bad.stderr


@pytest.mark.parametrize(
    ("validation", "message"),
    [
        ({"on_bad_rows": "drop"}, r"validation\.on_bad_rows: 'drop' is not one of fail, quarantine"),
        ({"severity": {"amount.rang": "warn"}}, r"validation\.severity.*unknown rule 'rang'"),
        ({"severity": {"amout.range": "warn"}}, r"validation\.severity: 'amout' is not a schema column"),
        ({"max_bad_row_share": 1.5}, r"validation\.max_bad_row_share: "),
        ({"min_rows": 10, "max_rows": 5}, r"validation\.max_rows: smaller than min_rows"),
    ],
)
def test_validation_policy_errors_name_the_field(tmp_path: Path, validation: dict, message: str) -> None:
    data = fraud() | {"validation": validation}
    with pytest.raises(SpecError, match=message):
        load_spec(write(tmp_path, "fraud", data))


def test_severity_lookup_prefers_the_column_rule() -> None:
    from kiln.spec import ValidationSpec

    policy = ValidationSpec(severity={"range": "warn", "amount.range": "error"})
    assert policy.severity_of("range", "amount") == "error"
    assert policy.severity_of("range", "customer_age") == "warn"
    assert policy.severity_of("allowed_values", "country") == "error"


def test_max_null_fraction_needs_a_nullable_column(tmp_path: Path) -> None:
    data = fraud()
    data["schema"]["amount"]["max_null_fraction"] = 0.1
    with pytest.raises(SpecError, match=r"schema\.amount\.max_null_fraction: only nullable columns"):
        load_spec(write(tmp_path, "fraud", data))
