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

    @model_validator(mode="after")
    def _check_bounds(self) -> ColumnSpec:
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
         "bad_row_share")


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


class TorchParams(_Strict):
    """``trainer.params`` of a torch trainer: an MLP on standardised features, early-stopped on a validation split."""

    epochs: int = Field(default=50, ge=1, le=100_000)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    hidden: list[int] = Field(default_factory=lambda: [64, 32])
    dropout: float = Field(default=0.0, ge=0, lt=1)
    patience: int = Field(default=10, ge=1)
    min_delta: float = Field(default=0.0, ge=0)
    val_fraction: float = Field(default=0.15, gt=0, lt=0.9)
    pos_weight: float | None = Field(default=None, gt=0)
    seed: int = 0

    @field_validator("hidden")
    @classmethod
    def _hidden(cls, value: list[int]) -> list[int]:
        if any(h < 1 for h in value):
            raise ValueError(f"layer sizes must be >= 1, got {value}")
        return value


class TrainerSpec(_Strict):
    kind: Literal["lightgbm", "torch"] = "lightgbm"
    params: dict[str, Any] = Field(default_factory=dict)
    resources: TrainerResources = Field(default_factory=TrainerResources)

    @model_validator(mode="after")
    def _torch_params(self) -> TrainerSpec:
        if self.kind == "torch":
            try:
                TorchParams.model_validate(self.params)
            except ValidationError as exc:
                item = exc.errors()[0]
                where = ".".join(str(p) for p in item["loc"])
                msg = "unknown torch parameter" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
                raise ValueError(f"params.{where}: {msg}") from None
        return self

    @property
    def torch_params(self) -> TorchParams:
        """The validated parameters of a torch trainer (defaults filled in)."""
        return TorchParams.model_validate(self.params)


class EvaluationSpec(_Strict):
    metric: Literal["roc_auc", "average_precision", "log_loss", "rmse", "mae", "r2"] = "roc_auc"
    min_improvement: float = 0.0
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
        if self.trainer.kind == "lightgbm" and self.evaluation.metric in ("rmse", "mae", "r2") and self.task == "classification":
            raise ValueError(f"evaluation.metric: '{self.evaluation.metric}' is a regression metric")
        return self

    @property
    def input_columns(self) -> list[str]:
        """The columns a client sends: the schema minus the target."""
        return [c for c in self.schema_ if c != self.target]

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


def _format_error(path: Path, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"] if part != "schema_") or "(top level)"
        loc = loc.replace("schema_", "schema")
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
        lines.append(f"{path}: {loc}: {msg}")
    return "\n".join(lines)


def load_spec(path: Path) -> PipelineSpec:
    """Parse and validate one spec file; the file name must equal the pipeline name."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(unknown position)"
        raise SpecError(f"{path}: {where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: (file): not UTF-8 text: {exc.reason}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: (top level): expected a mapping of fields, got {type(raw).__name__}")
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_error(path, exc)) from None
    if path.stem != spec.name:
        raise SpecError(f"{path}: name: '{spec.name}' must equal the file name '{path.stem}'")
    return spec


def load_specs(folder: Path | None = None) -> list[PipelineSpec]:
    """Load every ``*.yaml`` spec in the folder; all errors are reported together."""
    from kiln.settings import pipelines_dir

    folder = folder or pipelines_dir()
    if not folder.is_dir():
        raise SpecError(f"{folder}: pipelines folder does not exist")
    specs: list[PipelineSpec] = []
    errors: list[str] = []
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            specs.append(load_spec(path))
        except SpecError as exc:
            errors.append(str(exc))
    errors.extend(_duplicate_errors(specs))
    if errors:
        raise SpecError("\n".join(errors))
    return specs


def _duplicate_errors(specs: Iterable[PipelineSpec]) -> list[str]:
    seen: dict[str, int] = {}
    for spec in specs:
        seen[spec.name] = seen.get(spec.name, 0) + 1
    return [f"name: '{n}' is used by {c} specs" for n, c in seen.items() if c > 1]
