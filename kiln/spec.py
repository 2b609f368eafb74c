"""The pipeline spec: one YAML file per ML pipeline, validated with clear errors.

Errors name the file, the field path and the reason, e.g.
``pipelines/fraud.yaml: schema.amount.dtype: 'flaot' is not one of float, int, str, bool, datetime``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{1,40}$")
DTYPES = ("float", "int", "str", "bool", "datetime")


class SpecError(ValueError):
    """A pipeline spec is invalid; the message says file, field and reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnSpec(_Strict):
    """One source column of the data contract."""

    dtype: Literal["float", "int", "str", "bool", "datetime"]
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    allowed: list[str] | None = None
    key: bool = False
    max_null_fraction: float | None = Field(default=None, ge=0, le=1, description="nullable columns: most nulls allowed")
    coerce: bool = Field(default=False, description="bool: read 0/1 integers as false/true; int: read floats that are all whole numbers")
    timezone: Literal["UTC"] | None = Field(
        default=None, description="datetime: aware values are converted to UTC and naive ones taken as UTC; unset: aware values fail"
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> ColumnSpec:
        if self.coerce and self.dtype not in ("bool", "int"):
            raise ValueError(f"coerce applies to dtype bool (0/1) or int (whole floats), not {self.dtype}")
        if self.timezone is not None and self.dtype != "datetime":
            raise ValueError(f"timezone needs dtype datetime, not {self.dtype}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if (self.min is not None or self.max is not None) and self.dtype not in ("float", "int"):
            raise ValueError(f"min/max need a numeric dtype, not {self.dtype}")
        if self.allowed is not None and self.dtype != "str":
            raise ValueError(f"allowed values need dtype str, not {self.dtype}")
        return self


class SourceSpec(_Strict):
    """Where raw data lands: a folder (relative to the profile's source root), a glob, or an s3:// prefix."""

    path: str
    format: Literal["csv", "parquet"] = "parquet"
    partitions: Literal["daily", "none"] = "daily"
    start_date: str = "2026-01-01"
    timestamp_column: str | None = None
    simulator: str | None = Field(
        default=None, description="dotted path 'module:function' that writes example source files"
    )

    @field_validator("start_date")
    @classmethod
    def _iso_date(cls, value: str) -> str:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            raise ValueError(f"'{value}' is not a YYYY-MM-DD date")
        return value


RULES = ("readable", "columns_match", "row_count", "dtype", "not_null", "null_fraction", "range", "allowed_values", "unique_key",
         "bad_row_share", "partition_day", "key_in_other_partition", "target_rate")


class TargetRuleSpec(_Strict):
    """Rule ``target_rate``: the share of rows of one partition whose classification target is 1 (true) stays in bounds."""

    min_positive_rate: float | None = Field(default=None, ge=0, le=1)
    max_positive_rate: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _check_rates(self) -> TargetRuleSpec:
        if self.min_positive_rate is None and self.max_positive_rate is None:
            raise ValueError("set min_positive_rate, max_positive_rate or both")
        if self.min_positive_rate is not None and self.max_positive_rate is not None and self.min_positive_rate > self.max_positive_rate:
            raise ValueError(f"min_positive_rate ({self.min_positive_rate}) is greater than max_positive_rate ({self.max_positive_rate})")
        return self


class ValidationSpec(_Strict):
    """How the data contract treats bad input: which rules block, and what happens to bad rows."""

    on_bad_rows: Literal["fail", "quarantine"] = Field(
        default="quarantine", description="fail: any bad row fails the partition; quarantine: bad rows go to <p>/quarantine"
    )
    max_bad_row_share: float = Field(default=0.05, ge=0, le=1, description="over this share of quarantined rows the partition fails")
    extra_columns: Literal["fail", "ignore"] = Field(default="fail", description="ignore: extra source columns are dropped, with a warning")
    min_rows: int = Field(default=1, ge=0)
    max_rows: int | None = Field(default=None, ge=1)
    severity: dict[str, Literal["error", "warn"]] = Field(
        default_factory=dict, description="per rule ('range') or column rule ('amount.range'): error blocks, warn reports"
    )
    partition_tolerance_hours: float = Field(
        default=2, ge=0, description="daily partitions: how far source.timestamp_column may fall outside its day (rule partition_day)"
    )
    target: TargetRuleSpec | None = Field(
        default=None, description="bounds on the share of positive labels per partition (rule target_rate)"
    )

    @field_validator("severity")
    @classmethod
    def _known_rules(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            rule = name.rsplit(".", 1)[-1]
            if rule not in RULES:
                raise ValueError(f"'{name}': unknown rule '{rule}' (rules: {', '.join(RULES)})")
        return value

    def severity_of(self, rule: str, column: str | None) -> str:
        """``error`` (blocks) or ``warn`` (reports) for a rule on a column."""
        if column and f"{column}.{rule}" in self.severity:
            return self.severity[f"{column}.{rule}"]
        return self.severity.get(rule, "error")


class FeaturesSpec(_Strict):
    """Model inputs: pass-through columns, SQL expressions evaluated by polars, an optional Python function."""

    passthrough: list[str] = Field(default_factory=list)
    expressions: dict[str, str] = Field(default_factory=dict)
    categorical: list[str] = Field(default_factory=list)
    function: str | None = None


class TrainerResources(_Strict):
    cpu: str = "1"
    memory: str = "2Gi"
    gpu: int = 0


def _default_trainer_kind() -> str:
    from kiln.trainers import DEFAULT_KIND

    return DEFAULT_KIND


class TrainerSpec(_Strict):
    """Which trainer (``kiln.trainers``) fits the model, its params (validated by that trainer's params model), resources."""

    kind: str = Field(default_factory=_default_trainer_kind)
    params: dict[str, Any] = Field(default_factory=dict)
    resources: TrainerResources = Field(default_factory=TrainerResources)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from kiln.trainers import kinds

        if value not in kinds():
            raise ValueError(f"{value!r} is not one of {', '.join(kinds())}")
        return value

    @model_validator(mode="after")
    def _trainer_params(self) -> TrainerSpec:
        from kiln.trainers import validate_params

        validate_params(self.kind, self.params)  # "params.<field>: <reason>", from the trainer's own params model
        return self


class EvaluationSpec(_Strict):
    metric: Literal["roc_auc", "average_precision", "log_loss", "rmse", "mae", "r2"] = "roc_auc"
    # A challenger is promoted only when it beats the champion by strictly more than this: a tie never rolls.
    min_improvement: float = Field(default=0.001, ge=0.0)
    holdout: float = Field(default=0.2, gt=0.0, lt=0.9)

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in ("log_loss", "rmse", "mae")


class ReleaseSpec(_Strict):
    """How a challenger meets live traffic: canary (a stable hash-based share is served by it) or shadow (mirrored, never served)."""

    mode: Literal["none", "canary", "shadow"] = "none"
    challenger_share: float = Field(default=0.1, ge=0, le=1, description="canary: share of traffic the challenger serves")


class ServingSpec(_Strict):
    port: int = Field(default=3000, ge=1024, le=65535)
    max_batch_rows: int = Field(default=1000, ge=1)
    max_latency_ms: int = Field(default=20, ge=1)
    max_string_chars: int = Field(default=1024, ge=1, description="longest text value a request may carry (400 beyond)")
    timeout_s: float = Field(default=10.0, gt=0, le=600,
                             description="the endpoint's deadline for one request (504 beyond); keep it near the slowest "
                                         "batch you expect: every request keeps a server timer alive this long")
    workers: int = Field(default=0, ge=0, description="server worker processes; 0 = one per CPU")
    unknown_category: Literal["reject", "allow"] = Field(
        default="reject", description="reject: a category outside schema.allowed gets 400; allow: it is scored as missing"
    )
    access_log: bool = False
    release: ReleaseSpec = Field(default_factory=ReleaseSpec)
    replicas: int = Field(default=1, ge=1)
    cpu: str = "1"
    memory: str = "1Gi"
    gpu: int = 0


class DriftSpec(_Strict):
    method: Literal["psi", "js"] = "psi"
    threshold: float = Field(default=0.2, gt=0)
    min_samples: int = Field(default=500, ge=1)
    consecutive_windows: int = Field(default=2, ge=1)
    cooldown_minutes: float = Field(default=60.0, ge=0)
    drifted_feature_share: float = Field(default=0.3, gt=0, le=1)
    bins: int = Field(default=10, ge=2, le=100)
    # Family-wise false-alarm rate per window: a column also has to beat the Bonferroni noise bound (kiln.drift).
    alpha: float | None = Field(default=0.01, gt=0, lt=1)
    sensor_interval_seconds: int = Field(default=30, ge=1, le=86400)


class LabelsSpec(_Strict):
    """Ground truth that arrives after the prediction: files of (key, label, event time) joined to the prediction log."""

    path: str = Field(description="folder of label files, relative to the profile's source root")
    format: Literal["parquet", "csv"] = "parquet"
    key: str = Field(description="the column that matches a logged prediction's key (a schema key column)")
    label: str = Field(description="the realized target")
    event_time: str = Field(description="when the label became known (datetime)")
    lookback_days: float = Field(
        default=30, gt=0,
        description="how long a logged prediction can still get its label: `<p>/labels` reads the prediction log of "
                    "this span only (a label of an older prediction counts as unmatched); older windows keep their realized numbers")


RetrainSignal = Literal["drift", "estimated_performance", "realized_performance", "schedule"]
PerformanceMetric = Literal["roc_auc", "accuracy", "precision", "recall", "f1"]


class RetrainSpec(_Strict):
    """Which signals may launch `<p>_retrain`, and what must hold before it is launched."""

    # None: drift, plus estimated performance for classification, plus realized performance when labels arrive
    # (PipelineSpec.retrain_signals). A list names exactly the signals that may launch a retrain.
    signals: list[RetrainSignal] | None = None
    metric: PerformanceMetric = "roc_auc"
    estimated_drop: float = Field(default=0.02, gt=0, description="estimated metric below the reference by more than this")
    realized_drop: float = Field(default=0.02, gt=0, description="realized metric (from labels) below the reference by more than this")
    consecutive_windows: int = Field(default=2, ge=1, description="windows in a row a performance drop must last")
    schedule_days: float | None = Field(default=None, gt=0, description="schedule signal: retrain when the champion is older")
    min_new_rows: int = Field(default=1000, ge=0, description="new labeled training rows needed since the champion's training window")

    @model_validator(mode="after")
    def _schedule(self) -> RetrainSpec:
        if self.signals is not None and "schedule" in self.signals and self.schedule_days is None:
            raise ValueError("retrain.schedule_days: the schedule signal needs a period in days")
        return self


class PipelineSpec(_Strict):
    """One ML pipeline, from source files to a served model."""

    name: str
    description: str = ""
    owner: str = "unknown"
    source: SourceSpec
    schema_: dict[str, ColumnSpec] = Field(alias="schema")
    target: str
    task: Literal["classification", "regression"]
    features: FeaturesSpec
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    drift: DriftSpec = Field(default_factory=DriftSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    labels: LabelsSpec | None = None
    retrain: RetrainSpec = Field(default_factory=RetrainSpec)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError(f"'{value}' must match {NAME_PATTERN.pattern}")
        return value

    @model_validator(mode="after")
    def _cross_fields(self) -> PipelineSpec:
        columns = self.schema_
        if not columns:
            raise ValueError("schema: at least one column is required")
        if self.target not in columns:
            raise ValueError(f"target: '{self.target}' is not a schema column")
        for name in self.features.passthrough + self.features.categorical:
            if name not in columns:
                raise ValueError(f"features: '{name}' is not a schema column")
            if name == self.target:
                raise ValueError(f"features: the target '{name}' cannot be a feature")
        for name in self.features.categorical:
            if columns[name].allowed is None:
                raise ValueError(f"features.categorical: '{name}' needs schema.{name}.allowed")
        overlap = set(self.features.expressions) & set(self.features.passthrough + self.features.categorical)
        if overlap:
            raise ValueError(f"features.expressions: {sorted(overlap)} also listed as columns")
        if not (self.features.passthrough or self.features.expressions or self.features.categorical or self.features.function):
            raise ValueError("features: no features declared")
        for name in self.validation.severity:
            column = name.rsplit(".", 1)[0] if "." in name else None
            if column is not None and column not in columns:
                raise ValueError(f"validation.severity: '{column}' is not a schema column")
        for name, col in columns.items():
            if col.max_null_fraction is not None and not col.nullable:
                raise ValueError(f"schema.{name}.max_null_fraction: only nullable columns can have nulls")
        if self.validation.max_rows is not None and self.validation.max_rows < self.validation.min_rows:
            raise ValueError("validation.max_rows: smaller than min_rows")
        ts = self.source.timestamp_column
        if ts is not None and (ts not in columns or columns[ts].dtype != "datetime"):
            raise ValueError(f"source.timestamp_column: '{ts}' is not a datetime schema column")
        if self.task == "classification" and columns[self.target].dtype not in ("int", "bool"):
            raise ValueError("target: classification needs an int or bool target column")
        if self.validation.target is not None and self.task != "classification":
            raise ValueError("validation.target: positive-rate bounds need task classification")
        if self.labels is not None and self.labels.key not in self.key_columns:
            raise ValueError(f"labels.key: '{self.labels.key}' is not a schema key column (key: true)")
        named = set(self.retrain.signals or ())
        if "estimated_performance" in named and self.task != "classification":
            raise ValueError("retrain.signals: estimated_performance is estimated for classification only")
        if "realized_performance" in named and self.labels is None:
            raise ValueError("retrain.signals: realized_performance needs a labels: section")
        if self.task == "classification" and self.evaluation.metric in ("rmse", "mae", "r2"):
            raise ValueError(f"evaluation.metric: '{self.evaluation.metric}' is a regression metric")
        return self

    @property
    def input_columns(self) -> list[str]:
        """The columns a client sends: the schema minus the target."""
        return [c for c in self.schema_ if c != self.target]

    @property
    def retrain_signals(self) -> list[str]:
        """The signals that may launch `<p>_retrain`: the spec's list, or what this pipeline can measure."""
        if self.retrain.signals is not None:
            return list(self.retrain.signals)
        return ["drift"] + (["estimated_performance"] if self.task == "classification" else []) + (
            ["realized_performance"] if self.labels is not None else [])

    @property
    def key_columns(self) -> list[str]:
        return [c for c, col in self.schema_.items() if col.key]

    @property
    def feature_names(self) -> list[str]:
        """Model input columns in a fixed order: passthrough, categorical, then expressions."""
        return [*self.features.passthrough, *self.features.categorical, *self.features.expressions]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True))  # key order is feature order

    @classmethod
    def from_json(cls, text: str) -> PipelineSpec:
        return cls.model_validate(json.loads(text))


# A pipeline file is either a Dagster component instance (`platform_defs/pipelines/<name>/defs.yaml`:
# `type: platform_defs.component.KilnPipeline` and the spec under `attributes:`), which `dg` loads and checks,
# or a bare spec mapping (`<name>.yaml`), which older folders and KILN_PIPELINES_DIR may still hold.
PIPELINE_COMPONENT_TYPE = "platform_defs.component.KilnPipeline"
COMPONENT_FILES = ("defs.yaml", "defs.yml")
_TOP_FIELDS = {f.alias or n for n, f in PipelineSpec.model_fields.items()}


def pipeline_name_of(path: Path) -> str:
    """The name a spec file must carry: its folder's for ``<name>/defs.yaml``, else the file's stem."""
    return path.parent.name if path.name in COMPONENT_FILES else path.stem


def spec_files(folder: Path) -> list[Path]:
    """Every spec file of a pipelines folder: ``<name>/defs.yaml`` (component form) and ``<name>.yaml`` (bare)."""
    patterns = [f"*/{name}" for name in COMPONENT_FILES] + ["*.yaml", "*.yml"]
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def _line_of(node: Any, loc: Iterable[str | int]) -> int | None:
    """The 1-based line of the deepest YAML node on a field path (the key's line for a mapping entry)."""
    import yaml

    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            entry = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)), None)
            if entry is None:
                break
            line, node = entry[0].start_mark.line + 1, entry[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _format_error(path: Path, error: ValidationError, node: Any = None) -> str:
    lines = []
    for item in error.errors():
        parts: list[str | int] = ["schema" if part == "schema_" else part for part in item["loc"]]
        msg = item["msg"]
        if item["type"] == "literal_error":
            expected = item.get("ctx", {}).get("expected", "")
            options = ", ".join(o.strip().strip("'") for o in re.split(r",| or ", expected) if o.strip())
            msg = f"{item['input']!r} is not one of {options}"
        elif item["type"] == "extra_forbidden":
            msg = "unknown field"
        elif item["type"] == "missing":
            msg = "required field is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        # Cross-field rules of the whole spec raise "target: ..." from the model: name that field, not "(top level)".
        field = re.match(r"([a-z_][a-z0-9_]*(?:\.[A-Za-z0-9_]+)*): ", msg) if not parts else None
        if field and field.group(1).split(".")[0] in _TOP_FIELDS:
            parts, msg = list(field.group(1).split(".")), msg[field.end() :]
        loc = ".".join(str(part) for part in parts) or "(top level)"
        line = _line_of(node, parts)
        lines.append(f"{path}: {loc}: {msg}" + (f" (line {line})" if line else ""))
    return "\n".join(lines)


def _read(path: Path) -> tuple[dict[str, Any], Any]:
    """The spec mapping of a file in either form, and its YAML node (for line numbers); raises SpecError."""
    import yaml

    # One parse gives both the data and the node tree; libyaml's parser is ~10x faster (the code location reads every spec).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        parser = loader(path.read_text(encoding="utf-8"))
        try:
            root = parser.get_single_node()
            raw = parser.construct_document(root) if root is not None else None
        finally:
            parser.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(unknown position)"
        raise SpecError(f"{path}: {where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: (file): not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise SpecError(f"{path}: (file): cannot read: {exc.strerror}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: (top level): expected a mapping of fields, got {type(raw).__name__}")
    if "type" not in raw and path.name not in COMPONENT_FILES:
        return raw, root
    if raw.get("type") != PIPELINE_COMPONENT_TYPE:
        what = "required field is missing" if "type" not in raw else f"{raw['type']!r} is not Kiln's pipeline component"
        raise SpecError(f"{path}: type: {what}; write 'type: {PIPELINE_COMPONENT_TYPE}' (line {_line_of(root, ['type'])})")
    extras = sorted(str(k) for k in set(raw) - {"type", "attributes"})
    if extras:
        raise SpecError(f"{path}: {extras[0]}: unknown field (a pipeline file holds `type` and `attributes`) "
                        f"(line {_line_of(root, [extras[0]])})")
    attributes = raw.get("attributes")
    if not isinstance(attributes, dict):
        got = "nothing" if attributes is None else type(attributes).__name__
        raise SpecError(f"{path}: attributes: expected the pipeline spec as a mapping of fields, got {got} "
                        f"(line {_line_of(root, ['attributes'])})")
    node = next((v for k, v in getattr(root, "value", []) if k.value == "attributes"), None)
    return attributes, node


def spec_data(path: Path) -> dict[str, Any]:
    """The unvalidated spec mapping of a file in either form (a component's ``attributes``)."""
    return _read(path)[0]


def load_spec(path: Path) -> PipelineSpec:
    """Parse and validate one spec file; the pipeline name must equal the file's (or, for ``defs.yaml``, the folder's)."""
    data, node = _read(path)
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_error(path, exc, node)) from None
    expected = pipeline_name_of(path)
    if spec.name != expected:
        what = "folder" if path.name in COMPONENT_FILES else "file"
        raise SpecError(f"{path}: name: '{spec.name}' must equal the {what} name '{expected}' (line {_line_of(node, ['name'])})")
    return spec


def load_specs(folder: Path | None = None) -> list[PipelineSpec]:
    """Load every spec of the folder (``<name>/defs.yaml`` and ``<name>.yaml``); all errors are reported together."""
    from kiln.settings import pipelines_dir

    folder = folder or pipelines_dir()
    if not folder.is_dir():
        raise SpecError(f"{folder}: pipelines folder does not exist")
    specs: list[PipelineSpec] = []
    files: list[Path] = []
    errors: list[str] = []
    for path in spec_files(folder):
        try:
            specs.append(load_spec(path))
            files.append(path)
        except SpecError as exc:
            errors.append(str(exc))
    errors.extend(_duplicate_errors(specs, files))
    if errors:
        raise SpecError("\n".join(errors))
    return specs


def _duplicate_errors(specs: Iterable[PipelineSpec], files: Iterable[Path]) -> list[str]:
    seen: dict[str, list[Path]] = {}
    for spec, path in zip(specs, files, strict=True):
        seen.setdefault(spec.name, []).append(path)
    return [f"name: '{n}' is used by {len(ps)} specs: {', '.join(map(str, ps))} (keep one)" for n, ps in seen.items() if len(ps) > 1]
