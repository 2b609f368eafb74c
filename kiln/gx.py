"""Running contract rules as great-expectations suites, through GX's public API only.

An ephemeral context (no GX project on disk), one pandas data source per worker thread, one expectation suite and
validation definition per rule set, ``ValidationDefinition.run`` per batch. GX is imported inside function bodies:
``import great_expectations`` costs seconds.

Where the time goes, and what is done about it without touching GX's internals: GX fingerprints every batch it
loads (an md5 over a hash of every value: on a million rows the largest cost of a suite, and text costs most), so
each batch holds only the columns its rules read, the pass/fail round reads integer stand-ins for text where they
decide the same, and rules that read no values get a zero-row batch; GX plans each expectation's metrics afresh on
every run (a few milliseconds per expectation), which is a fixed cost per rule that nothing public avoids.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl

    from kiln.spec import PipelineSpec


@dataclass(frozen=True)
class Rule:
    """One expectation of the contract, named so a failure says which rule broke where."""

    name: str
    column: str | None
    expectation: str
    kwargs: dict[str, Any]


SAMPLES = 5  # unexpected values kept per failed rule
# A failed rule is reported from GX's BASIC result: unexpected count and percent, the first SAMPLES values.
# SUMMARY/COMPLETE add value counts and row indices that Kiln does not report (for pandas each copies the batch again).
_RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": SAMPLES}
_PASS_FAIL = {"result_format": "BOOLEAN_ONLY"}
_UNIQUE, _NOT_NULL, _OF_TYPE = "ExpectColumnValuesToBeUnique", "ExpectColumnValuesToNotBeNull", "ExpectColumnValuesToBeOfType"
# A column rule other than these two first drops the rows where its column is null, copying its whole batch to do so:
# on a column that has nulls it gets a one-column batch.
_KEEPS_NULL_ROWS = frozenset({_NOT_NULL, _OF_TYPE})
# Batches run on worker threads (pandas and pyarrow release the GIL while hashing); each worker has its own GX data
# source, hence its own execution engine, which keeps one active batch: two validations must never share one.
_GX_WORKERS = min(2, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else min(2, os.cpu_count() or 1)
_GX_LOCK = threading.Lock()
_GX_SUITES_KEPT = 256


@dataclass
class _Engine:
    """The process's ephemeral GX context, one pandas batch definition per worker, and the suites built so far."""

    context: Any
    workers: queue.SimpleQueue[int]
    batch_definitions: list[Any]
    runs: OrderedDict[tuple[str, ...], list[Any]] = field(default_factory=OrderedDict)  # rule set -> definition per worker
    made: int = 0


_ENGINE: _Engine | None = None


def _engine() -> _Engine:
    """One ephemeral GX context per process (no GX project on disk), with a pandas data source per worker."""
    global _ENGINE
    with _GX_LOCK:
        if _ENGINE is None:
            import great_expectations as gx
            from great_expectations.data_context.types.base import ProgressBarsConfig

            context = gx.get_context(mode="ephemeral")
            context.variables.progress_bars = ProgressBarsConfig(globally=False)
            workers: queue.SimpleQueue[int] = queue.SimpleQueue()
            definitions = []
            for i in range(_GX_WORKERS):
                asset = context.data_sources.add_pandas(f"kiln-{i}").add_dataframe_asset("frame")
                definitions.append(asset.add_batch_definition_whole_dataframe("all"))
                workers.put(i)
            _ENGINE = _Engine(context, workers, definitions)
    return _ENGINE


def _validation(engine: _Engine, rules: list[Rule], suite_name: str, worker: int) -> Any:
    """The GX validation definition of these rules on a worker's data source, built once per rule set.

    Each expectation carries its rule's position in its meta, so results are matched to rules, not to an order GX may
    change. Rule sets seen least recently are dropped from the context beyond _GX_SUITES_KEPT."""
    import great_expectations as gx

    cache_key = (suite_name, *(f"{r.expectation}{sorted(r.kwargs.items())!r}" for r in rules))
    with _GX_LOCK:
        if cache_key not in engine.runs:
            engine.made += 1
            name = f"{suite_name}#{engine.made}"
            expectations = [getattr(gx.expectations, r.expectation)(**r.kwargs, meta={"kiln_rule": i}) for i, r in enumerate(rules)]
            suite = engine.context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
            engine.runs[cache_key] = [
                engine.context.validation_definitions.add(gx.ValidationDefinition(name=f"{name}@{i}", data=definition, suite=suite))
                for i, definition in enumerate(engine.batch_definitions)
            ]
            while len(engine.runs) > _GX_SUITES_KEPT:
                _, dropped = engine.runs.popitem(last=False)
                for validation in dropped:
                    engine.context.validation_definitions.delete(validation.name)
                engine.context.suites.delete(dropped[0].suite.name)
        engine.runs.move_to_end(cache_key)
        return engine.runs[cache_key][worker]


def _validate(data: pd.DataFrame, rules: list[Rule], suite_name: str, result_format: dict[str, Any]) -> list[Any]:
    """These rules over one pandas batch, on a worker's own data source; the expectation results in rule order."""
    engine = _engine()
    worker = engine.workers.get()
    try:
        validation = _validation(engine, rules, suite_name, worker)
        results = validation.run(batch_parameters={"dataframe": data}, result_format=result_format).results
    finally:
        engine.workers.put(worker)
    by_rule = {res.expectation_config.meta["kiln_rule"]: res for res in results}
    return [by_rule[i] for i in range(len(rules))]


def run_rules(frame: pl.DataFrame, rules: list[Rule], suite_name: str, spec: PipelineSpec | None = None,
              arrow: bool = True) -> list[dict[str, Any]]:
    """Validate a frame with great-expectations 1.x; one dict per failed rule, with its severity from the spec.

    ``arrow=True`` hands GX Arrow-backed columns, so dtype rules see the spec's own type names (exact dtypes);
    value rules (ranges, sets, uniqueness) run much faster on NumPy-backed columns (``arrow=False``).
    """
    _engine()
    if not rules:
        return []
    # One pandas block per column (polars' Arrow path does this already): consolidating the NumPy columns into 2-D
    # blocks copies every value once more, and GX reads the columns one by one anyway.
    pdf = frame.to_pandas(use_pyarrow_extension_array=arrow) if arrow else frame.to_pandas(split_blocks=True)
    # Pass/fail first (GX's BOOLEAN_ONLY plans fewer metrics), text columns under stand-ins where a stand-in decides
    # the same; the rules that failed run again on the real values for their counts and samples.
    outcome = _run_batches(_batches(frame, pdf, rules, _stand_ins(frame, rules, arrow)), suite_name, _PASS_FAIL)
    failed = [rule for rule in rules if not outcome[id(rule)].success]
    if failed:
        outcome |= _run_batches(_batches(frame, pdf, failed, {}), f"{suite_name}:failed", _RESULT_FORMAT)
    return [_failure(rule, outcome[id(rule)], frame, spec) for rule in rules if not outcome[id(rule)].success]


def _failure(rule: Rule, res: Any, frame: pl.DataFrame, spec: PipelineSpec | None) -> dict[str, Any]:
    """A failed rule as Kiln reports it: rule, column, severity, counts, samples and what was observed."""
    detail = res.result or {}
    column = rule.column
    observed = str(detail.get("observed_value", ""))[:200]
    if rule.expectation == "ExpectTableColumnsToMatchSet":
        have = set(detail.get("observed_value") or frame.columns)
        missing = sorted(set(rule.kwargs["column_set"]) - have)
        extra = sorted(have - set(rule.kwargs["column_set"])) if rule.kwargs["exact_match"] else []
        column = ", ".join(missing + extra)
        observed = f"missing {missing}, unexpected {extra}"
    elif rule.name == "dtype" and spec is not None and rule.column is not None:
        observed = f"{frame.schema[rule.column]} (expected {spec.schema_[rule.column].dtype})"
    return {
        "rule": rule.name,
        "column": column,
        "severity": spec.validation.severity_of(rule.name, rule.column) if spec is not None else "error",
        "expectation": rule.expectation,
        "unexpected_count": detail.get("unexpected_count"),
        "unexpected_percent": round(float(detail.get("unexpected_percent") or 0.0), 3),
        "sample_values": [str(v) for v in (detail.get("partial_unexpected_list") or [])[:SAMPLES]],
        "observed": observed,
        "error": (res.exception_info or {}).get("exception_message"),
    }


def _stand_ins(frame: pl.DataFrame, rules: list[Rule], arrow: bool) -> dict[tuple[str, str], pd.Series]:
    """For the pass/fail round: integer stand-ins for text columns, which GX's batch fingerprint hashes slowly.

    - key uniqueness on a text column without nulls: 64-bit hashes of the keys. Equal keys have equal hashes, so
      distinct hashes prove distinct keys and the rule passes on them exactly when it would on the keys; a repeated
      hash (a duplicate key, or two keys colliding) fails it, and a failed rule always runs again on the keys, which
      decide it and give its count and samples. (With nulls the strings stay: hashes of nulls would repeat.)
    - not-null rules on a text column: the byte length of each value, null exactly where the text is null.

    Keyed by (expectation, column)."""
    import polars as pl

    out = {}
    for rule in rules:
        name = rule.column
        if name not in frame.columns or frame.schema[name] != pl.String:
            continue
        if rule.expectation == _UNIQUE and frame[name].null_count() == 0:
            out[(_UNIQUE, name)] = frame.select(pl.col(name).hash(seed=0)).to_pandas()[name]
        elif rule.expectation == _NOT_NULL:
            lengths = frame.select(pl.col(name).str.len_bytes())
            out[(_NOT_NULL, name)] = (lengths.to_pandas(use_pyarrow_extension_array=True) if arrow else lengths.to_pandas())[name]
    return out


def _batches(frame: pl.DataFrame, pdf: pd.DataFrame, rules: list[Rule],
             stand_ins: dict[tuple[str, str], pd.Series]) -> list[tuple[str, pd.DataFrame, list[Rule]]]:
    """Split the rules into GX batches of only the data they read: (label, pandas frame, rules).

    One-column batches for key uniqueness and for null-dropping rules on a column with nulls; a zero-row batch for the
    column-set and dtype rules; one batch for the other rules, of the columns they read. A column whose rules in a
    batch all have a stand-in (:func:`_stand_ins`) is validated on it. Longest first: uniqueness, then the others."""
    import pandas as pd

    null_counts = frame.null_count().row(0, named=True) if frame.width else {}
    groups: dict[tuple[int, str], list[Rule]] = {}
    for rule in rules:
        column = rule.column if rule.column in null_counts else None
        if rule.expectation == "ExpectTableColumnsToMatchSet" or (
                rule.expectation == _OF_TYPE and column is not None and pdf[column].dtype != object):
            where = (3, "shape")
        elif column is not None and rule.expectation == _UNIQUE:
            where = (0, column)
        elif column is not None and null_counts[column] > 0 and rule.expectation not in _KEEPS_NULL_ROWS:
            where = (2, column)
        else:
            where = (1, "table")
        groups.setdefault(where, []).append(rule)

    def data(group: list[Rule]) -> pd.DataFrame:
        picked = {}
        for name in dict.fromkeys(r.column for r in group if r.column in null_counts):
            kinds = {r.expectation for r in group if r.column == name}
            stand_in = stand_ins.get((kinds.pop(), name)) if len(kinds) == 1 else None
            picked[name] = pdf[name] if stand_in is None else stand_in
        return pd.DataFrame(picked, index=pdf.index, copy=False) if picked else pdf[[]]

    return [(label, pdf.head(0) if order == 3 else data(group), group) for (order, label), group in sorted(groups.items())]


def _run_batches(batches: list[tuple[str, pd.DataFrame, list[Rule]]], suite_name: str,
                 result_format: dict[str, Any]) -> dict[int, Any]:
    """Validate each batch (on worker threads when there are several); the GX result of each rule, by ``id(rule)``."""

    def validate(batch: tuple[str, pd.DataFrame, list[Rule]]) -> list[Any]:
        label, data, group = batch
        return _validate(data, group, f"{suite_name}:{label}", result_format)

    if len(batches) == 1 or _GX_WORKERS == 1:
        results = [validate(b) for b in batches]
    else:
        with ThreadPoolExecutor(max_workers=_GX_WORKERS, thread_name_prefix="kiln-gx") as pool:
            results = list(pool.map(validate, batches))
    return {id(rule): res for (_, _, group), group_results in zip(batches, results, strict=True)
            for rule, res in zip(group, group_results, strict=True)}
