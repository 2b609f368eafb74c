"""`kiln preview <p>`: train a changed pipeline on a sample of its source data and compare it with the champion.

The result is markdown for a pull request's job summary: the sample model's and the production champion's metrics on
the same holdout rows, the schema diff between the champion's spec (logged with its model as ``kiln/spec.json``) and
the changed one, and PSI per feature between the sample and the champion's reference profile
(``<state>/reference/<p>/reference.json``). It runs in-process with the functions the assets use (the same contract,
features, trainer, holdout split and metrics); it launches no Dagster run and registers nothing.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import polars as pl
    from upath import UPath

DEFAULT_SAMPLE_ROWS = 20_000
SPEC_ARTIFACT = "kiln/spec.json"  # where assets/model.py logs the spec a model was trained with


class PreviewError(ValueError):
    """The preview cannot run; the message says what is missing and where."""


@dataclass
class Champion:
    """The production model a change is compared with (``models:/<p>@champion``)."""

    version: str
    run_id: str
    spec: PipelineSpec | None
    spec_problem: str | None
    training_metrics: dict[str, float]
    holdout_metrics: dict[str, float | None] = field(default_factory=dict)


@dataclass
class DriftRow:
    """PSI of one feature between the sample and the reference profile (None: only on one side)."""

    feature: str
    kind: str
    psi: float | None
    drifted: bool
    note: str = ""


@dataclass
class PreviewResult:
    """Everything the markdown shows, for callers that want the numbers."""

    spec: PipelineSpec
    files: list[str]
    sample_rows: int
    train_rows: int
    holdout_rows: int
    metrics: dict[str, float | None]
    champion: Champion | None
    champion_lookup: str
    gate: str | None
    diff: list[tuple[str, Any, Any]]
    features_added: list[str]
    features_removed: list[str]
    drift: list[DriftRow]
    drift_note: str | None
    notes: list[str]


def load_changed_spec(pipeline: str, spec_file: Path | None) -> PipelineSpec:
    """The spec to preview: ``--spec FILE`` or the pipeline's file in the pipelines folder (the working tree)."""
    from kiln.settings import pipelines_dir
    from kiln.spec import load_spec, load_specs

    if spec_file is not None:
        spec = load_spec(spec_file)
        if spec.name != pipeline:
            raise PreviewError(f"{spec_file}: name: defines pipeline '{spec.name}', not '{pipeline}'")
        return spec
    specs = {s.name: s for s in load_specs()}
    if pipeline not in specs:
        raise PreviewError(f"no pipeline '{pipeline}' in {pipelines_dir()} (have: {', '.join(sorted(specs)) or 'none'})")
    return specs[pipeline]


def source_files(spec: PipelineSpec, storage: Any) -> list[UPath]:
    """The pipeline's source files, oldest first (daily files sort by their date names)."""
    path = spec.source.path
    pattern = f"*.{spec.source.format}"
    if any(ch in path for ch in "*?["):  # a glob: the folder part, then the file pattern
        path, _, pattern = path.rpartition("/")
    folder = storage.source_dir(path or ".")
    if folder.is_file():
        return [folder]
    if not folder.exists():
        raise PreviewError(f"{spec.name}: source folder {folder} does not exist (source.path: '{spec.source.path}')")
    files = sorted(folder.glob(pattern), key=lambda p: p.name)
    if not files:
        raise PreviewError(f"{spec.name}: no {pattern} files in {folder}")
    return files


def read_sample(spec: PipelineSpec, files: list[UPath], rows: int) -> tuple[pl.DataFrame, list[str]]:
    """The newest ``rows`` source rows, read from as few of the newest files as hold them, in time order."""
    import polars as pl

    from kiln.source import read_source

    frames: list[pl.DataFrame] = []
    used: list[str] = []
    have = 0
    for path in reversed(files):
        frame = read_source(path, spec)
        frames.append(frame)
        used.append(str(path))
        have += frame.height
        if have >= rows:
            break
    sample = pl.concat(list(reversed(frames)), how="diagonal_relaxed")
    ts = spec.source.timestamp_column
    if ts and ts in sample.columns:
        sample = sample.sort(ts, maintain_order=True)
    return sample.tail(rows), list(reversed(used))


def passing_rows(raw: pl.DataFrame, spec: PipelineSpec, who: str) -> pl.Series:
    """True for each row that the spec's data contract keeps (the rows `<p>/validated` would hold)."""
    from kiln.contracts import cast_to_spec, split_rows

    missing = [c for c in spec.schema_ if c not in raw.columns]
    if missing:
        raise PreviewError(f"{who}: schema columns {missing} are not in the source data (columns: {', '.join(raw.columns)})")
    try:
        typed = cast_to_spec(raw, spec).with_row_index("_row")
    except Exception as exc:  # polars raises InvalidOperationError / ComputeError on a failed cast
        raise PreviewError(f"{who}: the source data does not convert to the schema's dtypes: {str(exc).splitlines()[0]}") from exc
    good, _ = split_rows(typed, spec)
    return typed["_row"].is_in(good["_row"].implode())


def feature_frame(raw: pl.DataFrame, spec: PipelineSpec) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Typed source rows and their features (key, timestamp and target kept), row for row in the given order."""
    import polars as pl

    from kiln.contracts import cast_to_spec
    from kiln.features import compute_features

    typed = cast_to_spec(raw, spec)
    keep = [c for c in (*spec.key_columns, spec.source.timestamp_column, spec.target) if c]
    return typed, pl.concat([typed.select(keep), compute_features(typed, spec)], how="horizontal")


def score_all(names: list[str], y_true: Any, y_pred: Any, notes: list[str], who: str) -> dict[str, float | None]:
    """Every metric that can be computed; one that cannot (e.g. one class in the holdout) is None with a note."""
    from kiln.evaluation import score

    out: dict[str, float | None] = {}
    for name in names:
        try:
            out[name] = score(name, y_true, y_pred)
        except ValueError as exc:
            out[name] = None
            notes.append(f"{who}: {name} not computed: {exc}")
    return out


def fit_sample(train: pl.DataFrame, spec: PipelineSpec) -> Any:
    """A predictor trained on the sample's training rows with the spec's trainer (kiln.trainers), as `<p>/model` does."""
    from kiln.trainers import trainer_for

    try:
        trainer = trainer_for(spec)
    except ValueError as exc:  # e.g. an estimator path that imports but is no estimator for the task
        raise PreviewError(str(exc)) from exc
    return trainer.fit(train).predictor


def load_champion(spec: PipelineSpec, mlflow: Any) -> tuple[Champion | None, Any, str]:
    """The champion version, its spec and predictor (whatever trained it), or None with the reason (no registry entry, no alias)."""
    from kiln.trainers import load_predictor

    try:
        current = mlflow.champion(spec.name)
    except Exception as exc:  # an unreachable tracking server must not look like "no champion"
        raise PreviewError(f"MLflow at {mlflow.tracking_uri}: cannot look up models:/{spec.name}@champion: {exc}") from exc
    if current is None:
        return None, None, f"no production champion yet (`models:/{spec.name}@champion` does not exist in {mlflow.tracking_uri})"
    client = mlflow.client()
    run = client.get_run(current.run_id)
    champion_spec, problem = None, None
    with tempfile.TemporaryDirectory(prefix="kiln-preview-") as tmp:
        try:
            path = client.download_artifacts(current.run_id, SPEC_ARTIFACT, tmp)
            champion_spec = PipelineSpec.model_validate(json.loads(Path(path).read_text()))
        except Exception as exc:  # missing artifact (older model) or a spec that no longer validates
            problem = f"{SPEC_ARTIFACT} of run {current.run_id}: {str(exc).splitlines()[0][:300]}"
    # The champion predicts from features computed with its own spec; without that spec it is not scored.
    predictor = load_predictor(f"models:/{spec.name}/{current.version}", champion_spec) if champion_spec is not None else None
    champion = Champion(version=str(current.version), run_id=str(current.run_id), spec=champion_spec, spec_problem=problem,
                        training_metrics={k: float(v) for k, v in run.data.metrics.items()})
    return champion, predictor, f"`models:/{spec.name}@champion` is version {current.version}"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted field paths of a spec dump; lists stay whole values."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: value}


def spec_diff(old: PipelineSpec, new: PipelineSpec) -> list[tuple[str, Any, Any]]:
    """(field, champion value, changed value) for every field that differs; a missing side is None."""
    a = flatten(old.model_dump(mode="json", by_alias=True))
    b = flatten(new.model_dump(mode="json", by_alias=True))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def drift_rows(spec: PipelineSpec, typed: pl.DataFrame, features: pl.DataFrame, reference: dict[str, Any]) -> list[DriftRow]:
    """PSI per reference feature present in the sample; features only on one side are listed without a score."""
    import polars as pl

    from kiln.drift import bin_counts, column_scores
    from kiln.features import feature_columns

    numeric_ref = reference.get("numeric", {})
    categorical_ref = reference.get("categorical", {})
    numeric = [c for c in numeric_ref if c in features.columns and features.schema[c].is_numeric()]
    categorical = [c for c in categorical_ref if c in typed.columns and c not in numeric]
    subset = {
        "version": reference.get("version"),
        "n": reference.get("n"),
        "numeric": {c: numeric_ref[c] for c in numeric},
        "categorical": {c: categorical_ref[c] for c in categorical},
    }
    profile = pl.concat([features.select(numeric), typed.select(categorical)], how="horizontal")
    scores = column_scores(subset, bin_counts(profile, subset), "psi")
    threshold = spec.drift.threshold
    rows = [DriftRow(c, "numeric" if c in numeric else "categorical", s, s > threshold) for c, s in scores.items()]
    rows.sort(key=lambda r: -(r.psi or 0.0))
    for c in [*numeric_ref, *categorical_ref]:
        if c not in scores:
            rows.append(DriftRow(c, "numeric" if c in numeric_ref else "categorical", None, False, "in the reference, not in this change"))
    present = set(scores) | set(numeric_ref) | set(categorical_ref)
    for c in feature_columns(spec, features):
        if c not in present:
            rows.append(DriftRow(c, "categorical" if c in spec.features.categorical else "numeric", None, False,
                                 "new in this change: no reference yet"))
    return rows


def preview(spec: PipelineSpec, resources: dict[str, Any], sample_rows: int = DEFAULT_SAMPLE_ROWS) -> PreviewResult:
    """Train ``spec`` on the newest ``sample_rows`` source rows and compare it with the production champion."""

    from kiln.evaluation import gate, metric_names, split_holdout

    if sample_rows < 10:
        raise PreviewError(f"--sample-rows: {sample_rows} is too few to train and hold out rows (at least 10)")
    storage, mlflow = resources["storage"], resources["mlflow"]
    notes: list[str] = []
    champion, champion_predictor, lookup = load_champion(spec, mlflow)
    champion_spec = champion.spec if champion is not None else None
    if champion is not None and champion_spec is None:
        notes.append(f"the champion's spec could not be read ({champion.spec_problem}): no schema diff, no champion holdout metrics")

    raw, files = read_sample(spec, source_files(spec, storage), sample_rows)
    keep = passing_rows(raw, spec, "this change")
    if champion is not None and champion_spec is not None:
        # Both models are judged on the same rows: those that pass both data contracts.
        try:
            keep = keep & passing_rows(raw, champion_spec, f"champion v{champion.version} spec")
        except PreviewError as exc:
            notes.append(f"the champion cannot be scored on this data ({exc}): no champion holdout metrics")
            champion_spec = None
    rejected = raw.height - int(keep.sum())
    if rejected:
        notes.append(f"{rejected} of {raw.height} sampled rows break the data contract and are left out")
    raw = raw.filter(keep)
    typed, frame = feature_frame(raw, spec)
    try:
        train, holdout = split_holdout(frame, spec)
    except ValueError as exc:
        raise PreviewError(f"{exc}; raise --sample-rows") from exc
    names = metric_names(spec)
    model = fit_sample(train, spec)
    y_true = holdout[spec.target].to_numpy()
    metrics = score_all(names, y_true, model.predict(holdout), notes, "this change")

    verdict = None
    if champion is not None and champion_spec is not None:
        if (champion_spec.target, champion_spec.task) != (spec.target, spec.task):
            notes.append(f"target/task changed ({champion_spec.target}/{champion_spec.task} -> {spec.target}/{spec.task}): "
                         "the champion predicts something else, so its metrics are not comparable")
        else:
            _, champion_frame = feature_frame(raw, champion_spec)
            champion_holdout = champion_frame.slice(train.height)  # the same rows as `holdout`, in the same order
            champion.holdout_metrics = score_all(
                names, y_true, champion_predictor.predict(champion_holdout), notes, f"champion v{champion.version}")
            ours, theirs = metrics.get(spec.evaluation.metric), champion.holdout_metrics.get(spec.evaluation.metric)
            if ours is not None and theirs is not None:
                promote, reason = gate(ours, theirs, spec.evaluation)
                verdict = f"{'would be promoted' if promote else 'would not be promoted'}: {reason}"

    diff: list[tuple[str, Any, Any]] = []
    added: list[str] = []
    removed: list[str] = []
    if champion is not None and champion.spec is not None:
        diff = spec_diff(champion.spec, spec)
        before, after = set(champion.spec.feature_names), set(spec.feature_names)
        added, removed = sorted(after - before), sorted(before - after)

    drift: list[DriftRow] = []
    drift_note = None
    from kiln.reference import reference_path

    ref_path = reference_path(storage.state_root, spec.name)
    if ref_path.exists():
        try:
            drift = drift_rows(spec, typed, frame, json.loads(ref_path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:  # an old or foreign profile: say so, keep the rest
            drift_note = f"the reference profile {ref_path} cannot be compared with this sample: {exc}"
    else:
        drift_note = f"no reference profile at {ref_path} yet (it is written when {spec.name}/features is materialized)"
    return PreviewResult(
        spec=spec, files=files, sample_rows=raw.height, train_rows=train.height, holdout_rows=holdout.height, metrics=metrics,
        champion=champion, champion_lookup=lookup, gate=verdict, diff=diff, features_added=added, features_removed=removed,
        drift=drift, drift_note=drift_note, notes=notes,
    )


def _num(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _cell(value: Any) -> str:
    if value is None:
        return "(absent)"
    text = json.dumps(value) if not isinstance(value, str) else value
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def render(result: PreviewResult) -> str:
    """The markdown comparison posted as a pull request's job summary."""
    spec = result.spec
    champion = result.champion
    primary = spec.evaluation.metric
    files = result.files
    span = f"`{Path(files[0]).name}`" + (f" … `{Path(files[-1]).name}`" if len(files) > 1 else "")
    lines = [
        f"## Kiln preview: `{spec.name}`",
        "",
        f"A {spec.trainer.kind} model trained on a sample of {result.sample_rows} source rows from {len(files)} file(s) ({span}): "
        f"{result.train_rows} to train, the newest {result.holdout_rows} held out. Champion: {result.champion_lookup}.",
        "",
        "### Metrics on the same holdout",
        "",
    ]
    if champion is None:
        lines += ["**No production champion yet**: nothing to compare with; this change's sample model scores:", ""]
        lines += ["| metric | this change (sample) |", "|---|---|"]
        lines += [f"| {m}{' (gate)' if m == primary else ''} | {_num(v)} |" for m, v in result.metrics.items()]
    else:
        lines += [f"| metric | champion v{champion.version} | this change (sample) | Δ | champion at training (its own holdout) |",
                  "|---|---|---|---|---|"]
        for m, v in result.metrics.items():
            theirs = champion.holdout_metrics.get(m)
            delta = f"{v - theirs:+.4f}" if v is not None and theirs is not None else "—"
            lines.append(f"| {m}{' (gate)' if m == primary else ''} | {_num(theirs)} | {_num(v)} | {delta} | "
                         f"{_num(champion.training_metrics.get(m))} |")
        if result.gate:
            lines += ["", f"Gate on {primary} (min improvement {spec.evaluation.min_improvement}): this change {result.gate}. "
                          "A preview trains on a sample, so treat this as a signal, not the decision."]
    lines += ["", "### Schema diff (champion spec → this change)", ""]
    if champion is None:
        lines.append("No champion, so no spec to diff against.")
    elif champion.spec is None:
        lines.append(f"The champion's spec is not readable: {champion.spec_problem}.")
    elif not result.diff:
        lines.append("No differences: the spec is the one the champion was trained with.")
    else:
        lines.append(f"Features added: {', '.join(f'`{f}`' for f in result.features_added) or 'none'}; "
                     f"removed: {', '.join(f'`{f}`' for f in result.features_removed) or 'none'}.")
        lines += ["", f"| field | champion v{champion.version} | this change |", "|---|---|---|"]
        lines += [f"| `{k}` | {_cell(a)} | {_cell(b)} |" for k, a, b in result.diff]
    lines += ["", f"### Feature drift (PSI, sample vs the champion's reference profile; drifted above {spec.drift.threshold})", ""]
    if result.drift_note:
        lines.append(result.drift_note[0].upper() + result.drift_note[1:] + ".")
    else:
        drifted = [r.feature for r in result.drift if r.drifted]
        lines.append(f"{len(drifted)} of {sum(r.psi is not None for r in result.drift)} features drifted"
                     + (f": {', '.join(f'`{f}`' for f in drifted)}." if drifted else "."))
        lines += ["", "| feature | kind | PSI | drifted |", "|---|---|---|---|"]
        for r in result.drift:
            flag = "**yes**" if r.drifted else ("no" if r.psi is not None else r.note)
            lines.append(f"| `{r.feature}` | {r.kind} | {_num(r.psi)} | {flag} |")
    if result.notes:
        lines += ["", "### Notes", ""] + [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def run(pipeline: str, spec_file: Path | None = None, sample_rows: int = DEFAULT_SAMPLE_ROWS) -> str:
    """`kiln preview`: load the changed spec and the profile's resources, preview, and return the markdown."""
    from platform_defs.lifecycle import prepare_local_env
    from platform_defs.profiles import current_profile, initialized, resources

    if current_profile() == "local":
        prepare_local_env()
    spec = load_changed_spec(pipeline, spec_file)
    ready = initialized(resources(), "storage", "mlflow")
    return render(preview(spec, ready, sample_rows))
