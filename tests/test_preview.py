"""`kiln preview` on the example pipeline: a sample model against a real champion (Dagster materializations of the real
assets, a real MLflow registry on SQLite), with a deliberately changed spec and a drifted newest day of data."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from tests.conftest import FRAUD_SPEC, REPO

DAYS = 3
ROWS = 1500
SAMPLE = 3000
DROPPED = "amount_per_txn"


def _fraud_data() -> dict[str, Any]:
    """The shipped fraud spec as a bare mapping."""
    from kiln.spec import spec_data

    return spec_data(FRAUD_SPEC)


def _metric_row(markdown: str, metric: str) -> list[str]:
    """The cells of one row of the metrics table (``| average_precision (gate) | ... |``)."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and re.fullmatch(rf"{metric}( \(gate\))?", cells[0]):
            return cells
    raise AssertionError(f"no metrics row for {metric} in:\n{markdown}")


def _drift_row(markdown: str, feature: str) -> list[str]:
    for line in markdown.splitlines():
        if line.startswith(f"| `{feature}` |") and line.count("|") == 5:
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"no drift row for {feature} in:\n{markdown}")


@pytest.fixture(scope="module")
def previews(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from kiln.spec import load_spec
    from platform_defs.cli import main
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest, retrain, simulate, source_partitions
    from platform_defs.preview import preview, render, run
    from platform_defs.profiles import local_paths, resources

    # A KILN_HOME and Dagster instance of its own: this module's `fraud` registry and sources are not the session's.
    home = tmp_path_factory.mktemp("preview-home")
    spec_dir = tmp_path_factory.mktemp("preview-pipelines")
    shutil.copy(FRAUD_SPEC, spec_dir / "fraud.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_HOME", str(home))
        mp.setenv("KILN_PIPELINES_DIR", str(spec_dir))
        mp.delenv("KILN_SOURCE_ROOT", raising=False)
        # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI, so an earlier test module's registry would win.
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        spec = load_spec(spec_dir / "fraud.yaml")
        folder = local_paths()["sources"] / spec.source.path
        simulate(spec, folder, DAYS, ROWS, seed=5, start=date(2026, 1, 1))
        before_champion = run("fraud", sample_rows=SAMPLE)

        (home / "dagster").mkdir()
        instance = dg.DagsterInstance.local_temp(str(home / "dagster"))
        try:
            defs = build_definitions([spec])
            assert all(r.success for r in ingest(defs, spec, source_partitions(spec, folder), instance, progress=lambda _: None))
            trained = retrain(defs, spec, instance, progress=lambda _: None, stages=("features", "model", "champion"))
            assert trained.success
        finally:
            instance.dispose()
        champion = trained.output_for_node("fraud__champion")
        unchanged = preview(spec, resources("local"), SAMPLE)

        # The change under review: one feature dropped, one trainer param changed; and the newest day has drifted.
        data = _fraud_data()
        del data["features"]["expressions"][DROPPED]
        data["trainer"]["params"]["learning_rate"] = 0.1
        changed_dir = tmp_path_factory.mktemp("changed")
        (changed_dir / "fraud.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        simulate(spec, folder, 1, SAMPLE, drift=1.0, seed=6)
        out = changed_dir / "preview.md"
        rc = main(["preview", "fraud", "--spec", str(changed_dir / "fraud.yaml"), "--out", str(out), "--sample-rows", str(SAMPLE)])
        changed = preview(load_spec(changed_dir / "fraud.yaml"), resources("local"), SAMPLE)
        with pytest.MonkeyPatch.context() as prod:
            # The PR workflow runs previews in the prod profile: every location comes from environment variables.
            prod.setenv("KILN_PROFILE", "prod")
            prod.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
            prod.setenv("KILN_SOURCE_ROOT", str(home / "sources"))
            prod.setenv("KILN_STATE_ROOT", str(home / "state"))
            prod.setenv("KILN_STORAGE_PREFIX", str(home / "storage"))  # as deploy.yml sets it (asset values, bento exports)
            prod_md = run("fraud", changed_dir / "fraud.yaml", SAMPLE)
        yield {"prod_md": prod_md, "before_champion": before_champion, "champion": champion, "unchanged": unchanged,
               "unchanged_md": render(unchanged), "rc": rc, "changed_md": out.read_text() if out.exists() else "",
               "changed": changed, "changed_dir": changed_dir}


def test_without_a_champion_the_sample_metrics_are_still_reported(previews: dict[str, Any]) -> None:
    md = previews["before_champion"]
    assert "No production champion yet" in md and "`models:/fraud@champion` does not exist" in md
    cells = _metric_row(md, "average_precision")
    assert len(cells) == 2 and 0.0 < float(cells[1]) <= 1.0
    assert 0.5 < float(_metric_row(md, "roc_auc")[1]) <= 1.0
    assert "No champion, so no spec to diff against." in md
    assert "no reference profile" in md.lower()


def test_unchanged_spec_matches_the_champion_on_the_same_holdout(previews: dict[str, Any]) -> None:
    result = previews["unchanged"]
    assert result.champion is not None and result.champion.version == previews["champion"]["version"]
    assert result.diff == [] and "No differences" in previews["unchanged_md"]
    assert result.holdout_rows == round(SAMPLE * 0.2) and result.train_rows + result.holdout_rows == result.sample_rows == SAMPLE
    ours, theirs = result.metrics["average_precision"], result.champion.holdout_metrics["average_precision"]
    assert ours is not None and theirs is not None and 0.0 < ours <= 1.0 and 0.0 < theirs <= 1.0
    # The champion was trained on these very days, so the sample holds no drift against its reference.
    scored = [r for r in result.drift if r.psi is not None]
    assert len(scored) >= 10 and not [r.feature for r in scored if r.drifted]


def test_changed_spec_preview_markdown(previews: dict[str, Any]) -> None:
    assert previews["rc"] == 0
    md = previews["changed_md"]
    version = previews["champion"]["version"]
    assert f"champion v{version}" in md

    # Both models' metrics on the same holdout, and the delta between them.
    cells = _metric_row(md, "average_precision")
    champion, change, delta = float(cells[1]), float(cells[2]), float(cells[3])
    assert 0.0 < champion <= 1.0 and 0.0 < change <= 1.0
    assert delta == pytest.approx(change - champion, abs=2e-4)
    result = previews["changed"]
    assert result.champion is not None
    assert champion == pytest.approx(result.champion.holdout_metrics["average_precision"], abs=1e-4)
    assert "Gate on average_precision" in md

    # The schema diff names the dropped feature and the changed param with both values.
    assert f"removed: `{DROPPED}`" in md
    assert re.search(rf"\| `features\.expressions\.{DROPPED}` \| `[^|]+` \| \(absent\) \|", md)
    assert "| `trainer.params.learning_rate` | `0.05` | `0.1` |" in md
    assert {k for k, _, _ in result.diff} == {f"features.expressions.{DROPPED}", "trainer.params.learning_rate"}

    # Drift: the newest (drifted) day is the sample, the champion's reference is the calm days.
    assert "| feature | kind | PSI | drifted |" in md
    amount = _drift_row(md, "amount")
    assert float(amount[2]) > 0.2 and amount[3] == "**yes**"
    assert _drift_row(md, "channel")[3] == "**yes**"
    assert _drift_row(md, DROPPED)[3] == "in the reference, not in this change"


def test_prod_profile_preview_reads_the_same_registry_and_data(previews: dict[str, Any]) -> None:
    assert f"champion v{previews['champion']['version']}" in previews["prod_md"]
    assert previews["prod_md"] == previews["changed_md"]  # same sample, same deterministic training, same champion


def test_preview_refuses_a_spec_of_another_pipeline(previews: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from platform_defs.cli import main

    other = previews["changed_dir"] / "payments.yaml"
    data = _fraud_data() | {"name": "payments"}
    other.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["preview", "fraud", "--spec", str(other)]) == 1
    assert f"{other}: name: defines pipeline 'payments', not 'fraud'" in capsys.readouterr().err


def test_preview_of_unknown_pipeline_names_the_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from platform_defs.cli import main

    shutil.copy(FRAUD_SPEC, tmp_path / "fraud.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_PIPELINES_DIR", str(tmp_path))
        assert main(["preview", "nosuch"]) == 1
    assert f"no pipeline 'nosuch' in {tmp_path} (have: fraud)" in capsys.readouterr().err


def test_changed_spec_with_a_column_the_data_lacks_fails_naming_it(previews: dict[str, Any]) -> None:
    from kiln.spec import PipelineSpec
    from platform_defs.preview import PreviewError, preview
    from platform_defs.profiles import resources

    data = _fraud_data()
    data["schema"]["merchant_id"] = {"dtype": "str"}
    with pytest.raises(PreviewError, match=r"this change: schema columns \['merchant_id'\] are not in the source data"):
        preview(PipelineSpec.model_validate(data), resources("local"), SAMPLE)


def test_torch_pipeline_preview_on_an_unpartitioned_snapshot(previews: dict[str, Any], tmp_path: Path) -> None:
    """The shipped torch pipeline (one CSV snapshot, no daily partitions) previews with the torch trainer."""
    from kiln.spec import load_spec
    from platform_defs.lifecycle import simulate
    from platform_defs.preview import run
    from platform_defs.profiles import local_paths

    spec_file = tmp_path / "breast_cancer.yaml"
    shutil.copy(REPO / "platform_defs" / "pipelines" / "breast_cancer" / "defs.yaml", spec_file)
    spec = load_spec(spec_file)
    simulate(spec, local_paths()["sources"] / spec.source.path, 1, 569, seed=1)
    md = run("breast_cancer", spec_file, 1000)
    assert "A torch model trained on a sample of 569 source rows from 1 file(s)" in md
    assert "No production champion yet" in md
    assert 0.9 < float(_metric_row(md, "roc_auc")[1]) <= 1.0  # the Wisconsin data separates well
