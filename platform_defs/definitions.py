"""Composition root: every pipeline spec becomes its assets, checks, jobs and sensors.

Loading this module imports no ML library (torch, lightgbm, mlflow, bentoml, great_expectations,
polars, pandas): stage modules import them inside asset, check and sensor bodies.
"""

from __future__ import annotations

import dagster as dg

from assets import bento, champion, endpoint, features, model, predictions, raw, validated
from kiln.keys import key
from kiln.spec import PipelineSpec, load_specs
from platform_defs import k8s
from platform_defs.profiles import current_profile, resources
from sensors import drift, new_data


def pipeline_definitions(spec: PipelineSpec) -> dg.Definitions:
    """All Dagster objects of one pipeline, in group ``<p>``."""
    validated_parts = validated.build(spec)
    endpoint_parts = endpoint.build(spec)
    assets = [
        raw.build(spec),
        validated_parts[0],
        features.build(spec),
        model.build(spec),
        champion.build(spec),
        bento.build(spec),
        endpoint_parts[0],
        predictions.build(spec),
    ]
    checks = [*validated_parts[1:], *endpoint_parts[1:]]
    retrain_job = dg.define_asset_job(
        f"{spec.name}_retrain",
        selection=dg.AssetSelection.assets(*[key(spec.name, s) for s in ("features", "model", "champion", "bento", "endpoint")]),
        description="Retrain, gate, package and roll the endpoint to the champion.",
        tags={"kiln/pipeline": spec.name, "kiln/retrain": spec.name},  # deploy/dagster.yaml: one retrain per pipeline
    )
    ingest_job = dg.define_asset_job(
        f"{spec.name}_ingest",
        selection=dg.AssetSelection.assets(key(spec.name, "raw"), key(spec.name, "validated")).required_multi_asset_neighbors(),
        partitions_def=raw.partitions_def(spec),
        description="Ingest and validate one source partition.",
        tags={"kiln/pipeline": spec.name},
    )
    observe_job = dg.define_asset_job(
        f"{spec.name}_observe",
        selection=dg.AssetSelection.assets(key(spec.name, "predictions")),
        description="Ingest new prediction-log rows as a drift window (bin counts) with its drift report.",
        tags={"kiln/pipeline": spec.name},
    )
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[retrain_job, ingest_job, observe_job],
        sensors=[new_data.build(spec, ingest_job), drift.build(spec, retrain_job), drift.build_log_sensor(spec, observe_job)],
    )


def build_definitions(specs: list[PipelineSpec], profile: str | None = None) -> dg.Definitions:
    """Merge every pipeline's definitions with the profile's resources."""
    merged = dg.Definitions.merge(*[pipeline_definitions(s) for s in specs]) if specs else dg.Definitions()
    return dg.Definitions.merge(merged, dg.Definitions(resources=resources(profile), executor=k8s.executor(profile or current_profile())))


defs = build_definitions(load_specs())
