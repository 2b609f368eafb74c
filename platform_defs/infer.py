"""`kiln new <name> --from <file>`: infer a pipeline spec from a CSV or parquet sample.

It guesses what a person would write by hand: each column's dtype, nullability, numeric range, categories
(text columns with few distinct values, and dictionary-encoded/Categorical/Enum columns), a key (a unique text or int
column named like an id) and the target (``--target``, else a column named like a label). Constant and id-like columns
stay in the schema but are not features; the file says why in a comment. The endpoint gets a port that no other
pipeline of the folder uses and nothing on this machine listens on. The result is a normal spec, written as the
component file ``<name>/defs.yaml`` that validates and loads; the person then reviews it (feature ranges are the
observed ones, widened a little; a classification target keeps its exact observed values).
``dg scaffold defs platform_defs.component.KilnPipeline <name>`` writes the same file (or a skeleton).
"""

from __future__ import annotations

import json
import math
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.spec import NAME_PATTERN, PIPELINE_COMPONENT_TYPE, PipelineSpec, SpecError
from kiln.trainers import DEFAULT_KIND, kinds, trainer_class

if TYPE_CHECKING:
    import polars as pl

MAX_CATEGORIES = 30
TARGET_NAMES = ("target", "label", "y", "class", "outcome", "churn", "churned", "default", "fraud", "is_fraud")
KEY_PATTERN = re.compile(r"(^id$|_id$|^id_|^key$|_key$|^uuid$)")
RANGE_MARGIN = 0.1
MIN_IMPROVEMENT = 0.001  # a retrain that ties the champion (same data, same seed) is not promoted
PORTS = range(3100, 4000)
ID_MIN_ROWS = 20  # below this many rows, all-unique values say nothing about a column being an identifier


def read_sample(path: Path) -> pl.DataFrame:
    """A CSV (dtypes and dates inferred) or parquet file, with a clear error for anything else."""
    import polars as pl

    if not path.is_file():
        raise SpecError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pl.read_parquet(path)
        elif suffix in (".csv", ".txt"):
            frame = pl.read_csv(path, try_parse_dates=True, infer_schema_length=10_000)
        else:
            raise SpecError(f"{path}: expected a .csv or .parquet file, not '{suffix or 'no extension'}'")
    except SpecError:
        raise
    except Exception as exc:  # polars raises several error types for unreadable files
        raise SpecError(f"{path}: cannot read: {str(exc).splitlines()[0]}") from exc
    if frame.height == 0:
        raise SpecError(f"{path}: the sample has no rows; types and ranges cannot be inferred")
    return frame


def _dtype(series: pl.Series) -> str:
    import polars as pl

    dtype = series.dtype
    if dtype == pl.Boolean:
        return "bool"
    if dtype.is_integer():
        return "int"
    if dtype.is_float():
        return "float"
    if dtype in (pl.Datetime, pl.Date) or isinstance(dtype, pl.Datetime):
        return "datetime"
    return "str"


def _bounds(series: pl.Series, dtype: str) -> dict[str, Any]:
    """Observed min/max widened by a margin (never below zero for non-negative data)."""
    low, high = series.min(), series.max()
    if low is None or high is None:
        return {}
    low_f, high_f = float(low), float(high)  # type: ignore[arg-type]
    span = (high_f - low_f) or abs(high_f) or 1.0
    lo = low_f - RANGE_MARGIN * span if low_f < 0 else max(0.0, low_f - RANGE_MARGIN * span)
    hi = high_f + RANGE_MARGIN * span
    if dtype == "int":
        return {"min": int(math.floor(lo)), "max": int(math.ceil(hi))}
    return {"min": round(lo, 6), "max": round(hi, 6)}


def _categories(series: pl.Series) -> list[str] | None:
    """The declared categories of an Enum column, the observed ones of a Categorical; None for other dtypes."""
    import polars as pl

    if isinstance(series.dtype, pl.Enum):
        return [str(v) for v in series.dtype.categories.to_list()]
    if isinstance(series.dtype, pl.Categorical):
        return sorted(str(v) for v in series.drop_nulls().cast(pl.String).unique().to_list())
    return None


def _id_like(col: str, series: pl.Series, dtype: str, rows: int) -> bool:
    """Named like an identifier, or (with enough rows to tell) a text or int column with a different value in every row."""
    if dtype not in ("str", "int"):
        return False
    return bool(KEY_PATTERN.search(col.lower())) or (rows >= ID_MIN_ROWS and not series.null_count() and series.n_unique() == rows)


class InferredSpec(dict[str, Any]):
    """A spec mapping, and ``excluded``: ``{column: why it is not a feature}``, which :func:`component_text` writes as comments."""

    excluded: dict[str, str]


def infer_spec(name: str, frame: pl.DataFrame, fmt: str, source_path: str, target: str | None = None,
               port: int | None = None) -> InferredSpec:
    """A spec mapping for the sample: schema, key, target, task, features and serving port (validated by the caller)."""
    import polars as pl

    if not NAME_PATTERN.fullmatch(name):
        raise SpecError(f"name: '{name}' must match {NAME_PATTERN.pattern}")
    columns = list(frame.columns)
    if target is None:
        target = next((c for c in columns if c.lower() in TARGET_NAMES), None)
    if target is None:
        raise SpecError(f"target: no column looks like a label ({', '.join(TARGET_NAMES)}); pass --target <column>")
    if target not in columns:
        raise SpecError(f"target: '{target}' is not a column of the sample (columns: {', '.join(columns)})")

    schema: dict[str, dict[str, Any]] = {}
    categorical: list[str] = []
    passthrough: list[str] = []
    expressions: dict[str, str] = {}
    excluded: dict[str, str] = {}
    timestamp: str | None = None
    key_found = False
    for col in columns:
        series = frame[col]
        dtype = _dtype(series)
        entry: dict[str, Any] = {"dtype": dtype}
        if series.null_count():
            entry["nullable"] = True
        declared = _categories(series)
        text = series.cast(pl.String) if declared is not None else series
        distinct = text.drop_nulls().n_unique()
        if dtype in ("int", "float"):
            entry.update(_bounds(series, dtype))
        if col == target:
            schema[col] = entry
            continue
        if (not key_found and dtype in ("str", "int") and KEY_PATTERN.search(col.lower())
                and series.n_unique() == frame.height and not series.null_count()):
            entry = {"dtype": dtype, "key": True}
            key_found = True
            excluded[col] = "the key: one value per row identifies a record, it predicts nothing"
        elif distinct <= 1:
            value = text.drop_nulls().head(1).to_list()
            excluded[col] = (f"constant in the sample (every value is {value[0]!r})" if value else "empty in the sample (all null)") + \
                ": it cannot inform a model"
            if dtype == "str" and value:
                entry["allowed"] = [str(value[0])]
        elif _id_like(col, series, dtype, frame.height):
            why = "named like an identifier" if KEY_PATTERN.search(col.lower()) else f"a different value in each of {frame.height} rows"
            excluded[col] = f"id-like ({why}): it would memorize records, not learn"
        elif dtype == "str":
            values = declared if declared is not None else [str(v) for v in series.drop_nulls().unique().sort().to_list()]
            if declared is not None or (len(values) <= MAX_CATEGORIES and len(values) < max(2, frame.height // 2)):
                entry["allowed"] = values
            if len(values) <= MAX_CATEGORIES and "allowed" in entry:
                categorical.append(col)
            else:
                excluded[col] = f"text with {len(values)} distinct values: too many for a category (at most {MAX_CATEGORIES})"
        elif dtype == "datetime":
            timestamp = timestamp or col
            expressions[f"{col}_hour"] = f"EXTRACT(HOUR FROM {col})"
            expressions[f"{col}_dow"] = f"EXTRACT(DOW FROM {col})"
            excluded[col] = f"a timestamp: used through {col}_hour and {col}_dow"
        else:
            passthrough.append(col)
        schema[col] = entry

    target_type = schema[target]["dtype"]
    target_values = frame[target].n_unique()
    severity: dict[str, str] = {}
    if target_type == "bool" or (target_type == "int" and target_values <= 2):
        task = "classification"
        schema[target].pop("nullable", None)
        if target_type == "int":  # the labels are the observed classes, exactly: 0/1 stays [0, 1]
            schema[target].update({"min": int(frame[target].min()), "max": int(frame[target].max())})  # type: ignore[arg-type]
        metric = "roc_auc"
    elif target_type in ("int", "float"):
        task, metric = "regression", "rmse"
        # The target keeps its observed range; a new extreme is reported by the quality check, not quarantined.
        low, high = frame[target].min(), frame[target].max()
        if low is not None and high is not None:
            cast = int if target_type == "int" else float
            schema[target].update({"min": cast(low), "max": cast(high)})  # type: ignore[arg-type]
            severity[f"{target}.range"] = "warn"
    else:
        raise SpecError(f"target: '{target}' is {target_type}; Kiln trains binary classifiers (int 0/1 or bool) "
                        "and regressors (numbers)")
    if not (passthrough or categorical or expressions):
        raise SpecError("features: the sample has no usable feature columns besides the target and key"
                        + "".join(f"\n  {c}: {why}" for c, why in excluded.items()))
    spec = InferredSpec({
        "name": name,
        "description": f"Inferred from a {fmt} sample of {frame.height} rows; review ranges and categories.",
        "owner": "unknown",
        "source": {"path": source_path, "format": fmt, "partitions": "none", **({"timestamp_column": timestamp} if timestamp else {})},
        "schema": schema,
        "target": target,
        "task": task,
        "features": {"passthrough": passthrough, "categorical": categorical, "expressions": expressions},
        "trainer": {"kind": DEFAULT_KIND, "params": dict(trainer_class(DEFAULT_KIND).starter_params)},
        "evaluation": {"metric": metric, "min_improvement": MIN_IMPROVEMENT, "holdout": 0.2},
        **({"serving": {"port": port}} if port is not None else {}),
        **({"validation": {"severity": severity}} if severity else {}),
    })
    spec.excluded = excluded
    return spec


def _ports_of_specs(folder: Path) -> set[int]:
    """The serving ports the folder's spec files name (3000 where a spec has no serving block); unreadable files count none."""
    from kiln.spec import spec_data, spec_files

    ports: set[int] = set()
    for path in spec_files(folder) if folder.is_dir() else []:
        try:
            serving = spec_data(path).get("serving") or {}
        except SpecError:
            continue
        port = serving.get("port", 3000) if isinstance(serving, dict) else 3000
        if isinstance(port, int):
            ports.add(port)
    return ports


def _bound(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def free_port(folder: Path | None) -> int:
    """The first port of 3100-3999 that no spec of the folder uses and nothing on 127.0.0.1 is bound to."""
    taken = _ports_of_specs(folder) if folder is not None else set()
    for port in PORTS:
        if port not in taken and not _bound(port):
            return port
    raise SpecError(f"serving.port: every port of {PORTS.start}-{PORTS.stop - 1} is taken; free one or set serving.port by hand")


SKELETON = """\
# The `{name}` pipeline: a Kiln pipeline spec, as a Dagster component (`dg check yaml` validates it).
# Replace the example columns with your data's, then `kiln validate`. To infer the schema from a sample
# instead: `kiln new {name} --from sample.csv` (or `dg scaffold defs ... --sample sample.csv`).
type: {type}
attributes:
  name: {name}  # must equal this folder's name
  description: "TODO: what this model predicts, for whom."
  owner: unknown
  source:
    path: {name}  # folder under the source root (KILN_SOURCE_ROOT), a glob, or s3://bucket/prefix
    format: csv                  # csv | parquet
    partitions: none             # none | daily (one file per day, named by date)
  schema:                        # the data contract: every source column
    record_id: {{dtype: str, key: true}}
    amount: {{dtype: float, nullable: true, min: 0}}
    segment: {{dtype: str, allowed: [a, b, c]}}
    label: {{dtype: int, min: 0, max: 1}}
  target: label
  task: classification           # classification | regression
  features:
    passthrough: [amount]
    categorical: [segment]       # columns with `allowed` values
    expressions:                 # SQL over the schema columns, evaluated by polars
      log_amount: "LN(amount + 1)"
  trainer:
    kind: {kind:<22} # {kinds}
    params: {params}
  evaluation:
    metric: roc_auc              # a challenger must beat the champion on this metric
    min_improvement: {min_improvement}  # by at least this much: a retrain that ties the champion is not promoted
    holdout: 0.2
"""


def skeleton_text(name: str) -> str:
    """A commented ``defs.yaml`` for a new pipeline that validates as it is (example columns to replace)."""
    if not NAME_PATTERN.fullmatch(name):
        raise SpecError(f"name: '{name}' must match {NAME_PATTERN.pattern}")
    params = json.dumps(trainer_class(DEFAULT_KIND).starter_params).replace('"', "")  # YAML flow style, as written by hand
    return SKELETON.format(name=name, type=PIPELINE_COMPONENT_TYPE, kind=DEFAULT_KIND, kinds=" | ".join(kinds()), params=params,
                           min_improvement=MIN_IMPROVEMENT)


def component_text(data: dict[str, Any], note: str) -> str:
    """A spec mapping as a component file: ``type:`` Kiln's pipeline component, the spec under ``attributes:``.

    For an :class:`InferredSpec`, a comment above ``features:`` says why each column left out of them is left out."""
    import yaml

    body = yaml.safe_dump({"type": PIPELINE_COMPONENT_TYPE, "attributes": dict(data)}, sort_keys=False, default_flow_style=None,
                          width=120)
    excluded: dict[str, str] = getattr(data, "excluded", {})
    if excluded:
        lines = ["  # Not features (still checked by the data contract):"]
        lines += [f"  #   {column}: {why}" for column, why in excluded.items()]
        body = body.replace("\n  features:", "\n" + "\n".join(lines) + "\n  features:", 1)
    return f"# {note}\n{body}"


def infer_from_sample(name: str, sample: Path, target: str | None = None, source_path: str | None = None,
                      folder: Path | None = None) -> InferredSpec:
    """The validated spec mapping inferred from a CSV or parquet sample; its port is free in ``folder`` (default: the pipelines folder)."""
    from kiln.settings import pipelines_dir

    frame = read_sample(sample)
    fmt = "parquet" if sample.suffix.lower() == ".parquet" else "csv"
    data = infer_spec(name, frame, fmt, source_path or name, target, port=free_port(folder or pipelines_dir()))
    PipelineSpec.model_validate(data)  # a bug here is ours, not the user's: fail loudly before writing
    return data


def write_spec(name: str, sample: Path, folder: Path, target: str | None = None, source_path: str | None = None,
               force: bool = False) -> Path:
    """Infer, validate and write ``<folder>/<name>/defs.yaml``; refuses to overwrite unless ``force``."""
    out = folder / name / "defs.yaml"
    existing = [p for p in (out, folder / f"{name}.yaml", folder / f"{name}.yml") if p.exists()]
    if existing and not force:
        raise SpecError(f"{existing[0]}: already exists (use --force to replace it)")
    data = infer_from_sample(name, sample, target, source_path, folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(component_text(data, f"Inferred by `kiln new {name} --from {sample.name}`: review ranges, categories, key and target."),
                   encoding="utf-8")
    for old in existing:  # --force: the new file replaces a bare <name>.yaml too, so the name stays unique
        if old != out:
            old.unlink()
    return out
