"""Kiln's pipeline as a Dagster Component: ``platform_defs/pipelines/<name>/defs.yaml`` is one instance.

The component's attributes are the pipeline spec (``kiln.spec.PipelineSpec``), so ``dg check yaml`` validates a
spec against the spec's own JSON schema and names file, line and field; ``dg list components`` shows the type;
``dg scaffold defs platform_defs.component.KilnPipeline <name>`` writes a spec that loads (a skeleton, or one
inferred from ``--sample``). ``platform_defs.definitions`` reads the same files through ``kiln.spec.load_specs``
(which also honours ``KILN_PIPELINES_DIR``) and builds each with :func:`pipeline_definitions`, as ``build_defs`` does.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import BaseModel, ConfigDict, Field

from assets import bento, champion, endpoint, features, image, labels, model, predictions, raw, validated
from kiln.keys import key
from kiln.spec import NAME_PATTERN, PipelineSpec, SpecError, pipeline_name_of
from platform_defs.lifecycle import RETRAIN_STAGES
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
        image.build(spec),
        endpoint_parts[0],
        predictions.build(spec),
        *([labels.build(spec)] if spec.labels is not None else []),
    ]
    checks = [*validated_parts[1:], *endpoint_parts[1:]]
    retrain_job = dg.define_asset_job(
        f"{spec.name}_retrain",
        selection=dg.AssetSelection.assets(*[key(spec.name, s) for s in RETRAIN_STAGES]),
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
    observed = [key(spec.name, "predictions")] + ([key(spec.name, "labels")] if spec.labels is not None else [])
    observe_job = dg.define_asset_job(
        f"{spec.name}_observe",
        selection=dg.AssetSelection.assets(*observed),
        description="Ingest new prediction-log rows as a drift window (bin counts, performance estimate) with its drift "
                    "report" + ("; join arrived labels (realized performance)." if spec.labels is not None else "."),
        tags={"kiln/pipeline": spec.name},
    )
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[retrain_job, ingest_job, observe_job],
        sensors=[new_data.build(spec, ingest_job), drift.build(spec, retrain_job), drift.build_log_sensor(spec, observe_job)],
    )


class KilnPipelineScaffoldParams(BaseModel):
    """Options of ``dg scaffold defs platform_defs.component.KilnPipeline <name>``."""

    model_config = ConfigDict(extra="forbid")

    sample: str | None = Field(default=None, description="a CSV or parquet sample to infer the spec from (as `kiln new --from`)")
    target: str | None = Field(default=None, description="with --sample: the label column (default: one named like a label)")


class KilnPipelineScaffolder(dg.Scaffolder[KilnPipelineScaffoldParams]):
    """Writes ``<name>/defs.yaml``: a commented skeleton that loads, or a spec inferred from ``--sample``."""

    @classmethod
    def get_scaffold_params(cls) -> type[KilnPipelineScaffoldParams]:
        return KilnPipelineScaffoldParams

    def scaffold(self, request: dg.ScaffoldRequest[KilnPipelineScaffoldParams]) -> None:
        folder = Path(request.target_path)
        try:
            text = _scaffold_text(folder.name, request)
        except SpecError:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()  # dg made it for us: leave no half-made pipeline behind
            raise
        (folder / "defs.yaml").write_text(text, encoding="utf-8")


def _scaffold_text(name: str, request: dg.ScaffoldRequest[KilnPipelineScaffoldParams]) -> str:
    from platform_defs.infer import component_text, infer_from_sample, skeleton_text

    if request.scaffold_format != "yaml":
        raise SpecError("a Kiln pipeline is a YAML spec: scaffold it with --format yaml (the default)")
    if not NAME_PATTERN.fullmatch(name):
        raise SpecError(f"{name}: a pipeline name must match {NAME_PATTERN.pattern}")
    params = request.params or KilnPipelineScaffoldParams()
    if not params.sample:
        return skeleton_text(name)
    sample = Path(params.sample)
    data = infer_from_sample(name, sample, target=params.target)
    return component_text(data, f"Inferred by `dg scaffold defs` from {sample.name}: review ranges, categories, key and target.")


@dg.scaffold_with(KilnPipelineScaffolder)
class KilnPipeline(dg.Component):
    """One Kiln ML pipeline, from source files to a monitored endpoint; the attributes are the pipeline spec.

    Builds the assets raw -> validated -> features -> model -> champion -> bento -> image -> endpoint -> predictions (group
    ``<name>``), their contract checks and champion gate, the new-data and drift sensors and the retrain job.
    The folder name is the pipeline name.
    """

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        # The spec model itself, not a copy: `dg check yaml`, dagster's loader and `kiln validate` share one schema.
        return PipelineSpec

    @classmethod
    def load(cls, attributes: BaseModel | None, context: dg.ComponentLoadContext) -> KilnPipeline:
        """The component for a validated spec whose name equals its folder's."""
        where = context.path / "defs.yaml"
        if not isinstance(attributes, PipelineSpec):
            raise SpecError(f"{where}: attributes: required field is missing (the pipeline spec)")
        expected = pipeline_name_of(where)
        if attributes.name != expected:
            raise SpecError(f"{where}: name: '{attributes.name}' must equal the folder name '{expected}'")
        return cls(attributes)

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return pipeline_definitions(self.spec)

