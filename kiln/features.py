"""Feature computation: the one implementation that `<p>/features`, training, the gate and the endpoint share.

Parity by construction: the served model gets its inputs from :func:`compute_features`, exactly as it was trained.
Imports no heavy package at top level (polars is imported inside functions).
"""

from __future__ import annotations

import hashlib
import importlib
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import polars as pl

SMOKE_ROWS = 20  # request rows kept from the training source for the endpoint's smoke test


def load_function(dotted: str) -> Any:
    """Resolve ``package.module:function`` (or ``package.module.function``)."""
    module_name, _, attr = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot load '{dotted}': {exc}") from exc


@lru_cache(maxsize=32)
def _expressions(spec_json: str) -> tuple[list[Any], Any]:
    import polars as pl

    spec = PipelineSpec.from_json(spec_json)
    exprs: list[Any] = [pl.col(c).cast(pl.Float64).alias(c) for c in spec.features.passthrough]
    for name in spec.features.categorical:
        allowed = spec.schema_[name].allowed or []
        # The code of a category is its position in `allowed`; unknown categories become null (LightGBM's missing)
        # instead of a made-up code. Distinct strings go through a non-strict Enum cast (the same codes, and some
        # 25x cheaper per call than replace_strict, which builds a mapping table each time: what a served batch of a
        # few rows pays); anything else through replace_strict.
        if allowed and all(type(v) is str for v in allowed) and len(set(allowed)) == len(allowed):
            code = pl.col(name).cast(pl.Enum(allowed), strict=False).to_physical().cast(pl.Int32)
        else:
            code = pl.col(name).replace_strict(allowed, list(range(len(allowed))), default=None, return_dtype=pl.Int32)
        exprs.append(code.alias(name))
    for name, sql in spec.features.expressions.items():
        try:
            exprs.append(pl.sql_expr(sql).cast(pl.Float64).alias(name))
        except Exception as exc:  # polars raises SQLSyntaxError / ComputeError
            raise ValueError(f"{spec.name}: features.expressions.{name}: cannot parse '{sql}': {exc}") from exc
    function = load_function(spec.features.function) if spec.features.function else None
    return exprs, function


_SPEC_JSON: dict[int, tuple[PipelineSpec, str]] = {}
# Up to this many rows the feature expressions run one after another on the calling thread (``select_seq``): for a
# served batch of a few rows each expression is microseconds of work, and handing them to polars' thread pool costs
# more than that (a wake-up per pool thread per call, whose spinning then competes with the server for the CPUs).
SEQUENTIAL_ROWS = 50_000


def _spec_json(spec: PipelineSpec) -> str:
    """``spec.to_json()`` once per spec object: serving calls compute_features per batch, and dumping costs ~0.1 ms."""
    cached = _SPEC_JSON.get(id(spec))
    if cached is None or cached[0] is not spec:
        if len(_SPEC_JSON) > 64:
            _SPEC_JSON.clear()
        cached = _SPEC_JSON[id(spec)] = (spec, spec.to_json())
    return cached[1]


def compute_features(frame: pl.DataFrame, spec: PipelineSpec) -> pl.DataFrame:
    """The model's input matrix for rows of source columns, in ``spec.feature_names`` order."""
    exprs, function = _expressions(_spec_json(spec))
    out = frame.select_seq(exprs) if frame.height <= SEQUENTIAL_ROWS else frame.select(exprs)
    if function is not None:
        extra = function(frame)
        out = out.with_columns(extra.select([c for c in extra.columns if c not in out.columns]))
    return out


def feature_columns(spec: PipelineSpec, frame: pl.DataFrame) -> list[str]:
    """The features present in a computed frame (declared ones plus any a feature function added)."""
    reserved = {spec.target, *spec.key_columns, spec.source.timestamp_column}
    declared = spec.feature_names
    return declared + [c for c in frame.columns if c not in declared and c not in reserved]


def data_version(frame: pl.DataFrame) -> str:
    """A content hash of a frame, independent of how it was chunked."""
    digest = hashlib.sha256()
    digest.update(",".join(f"{n}:{t}" for n, t in frame.schema.items()).encode())
    digest.update(frame.hash_rows(seed=0).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def feature_table(frames: list[pl.DataFrame], spec: PipelineSpec) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Validated partitions joined in time order, and their features with key, timestamp and target kept."""
    import polars as pl

    source = pl.concat(frames, how="vertical_relaxed")
    ts = spec.source.timestamp_column
    if ts:
        source = source.sort(ts)
    keep = [c for c in (*spec.key_columns, ts, spec.target) if c]
    return source, pl.concat([source.select(keep), compute_features(source, spec)], how="horizontal")


def profile_frame(spec: PipelineSpec, source: pl.DataFrame, frame: pl.DataFrame) -> tuple[pl.DataFrame, list[str], dict[str, list[str]]]:
    """What drift is measured on: numeric features as computed, categoricals as raw values (so `other` is visible)."""
    import polars as pl

    numeric = [c for c in feature_columns(spec, frame) if c not in spec.features.categorical]
    categorical = {c: list(spec.schema_[c].allowed or []) for c in spec.features.categorical}
    return pl.concat([frame.select(numeric), source.select(list(categorical))], how="horizontal"), numeric, categorical


def feature_reference(spec: PipelineSpec, source: pl.DataFrame, frame: pl.DataFrame) -> dict[str, Any]:
    """The drift reference profile of a training set (bin edges and counts per feature)."""
    from kiln.drift import build_reference

    profile_input, numeric, categorical = profile_frame(spec, source, frame)
    return build_reference(profile_input, numeric=numeric, categorical=categorical, bins=spec.drift.bins)


def sample_rows(frame: pl.DataFrame, spec: PipelineSpec, n: int = SMOKE_ROWS) -> list[dict[str, Any]]:
    """Request rows (input columns, datetimes as ISO text) from source data, as a client would send them."""
    import polars as pl

    rows = frame.select(spec.input_columns).tail(n)
    rows = rows.with_columns(
        [pl.col(c).dt.to_string("%Y-%m-%dT%H:%M:%S%.f") for c, t in rows.schema.items() if t == pl.Datetime]
    )
    return rows.to_dicts()


def feature_sources(spec: PipelineSpec) -> dict[str, list[str]]:
    """Which source columns each feature is computed from (column lineage).

    Pass-through and categorical features come from their own column; an SQL expression from every schema column
    it names. Features of a Python ``function`` are opaque and get none."""
    sources: dict[str, list[str]] = {n: [n] for n in [*spec.features.passthrough, *spec.features.categorical]}
    for name, expression in spec.features.expressions.items():
        sources[name] = [c for c in spec.schema_ if re.search(rf"\b{re.escape(c)}\b", expression)]
    sources[spec.target] = [spec.target]
    return sources
