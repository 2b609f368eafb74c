"""Composition root: every pipeline spec becomes its assets, checks, jobs and sensors, plus the profile's resources.

Each spec is a ``KilnPipeline`` component instance (``platform_defs/pipelines/<name>/defs.yaml``); this module reads
them with Kiln's own loader rather than ``dg.load_from_defs_folder`` so that ``KILN_PIPELINES_DIR`` (a folder outside
the package) and an installed wheel (no pyproject.toml to find the project by) work the same way. ``dg list defs``
loads this module too (``[tool.dg.project] code_location_target_module``).

Loading this module imports no ML library (torch, lightgbm, mlflow, bentoml, great_expectations,
polars, pandas): stage modules import them inside asset, check and sensor bodies.
"""

from __future__ import annotations

import dagster as dg

from kiln.spec import PipelineSpec, load_specs
from platform_defs.component import pipeline_definitions
from platform_defs.profiles import current_profile, executor, resources

__all__ = ["build_definitions", "defs", "pipeline_definitions"]


def build_definitions(specs: list[PipelineSpec], profile: str | None = None) -> dg.Definitions:
    """Merge every pipeline's definitions with the profile's resources."""
    merged = dg.Definitions.merge(*[pipeline_definitions(s) for s in specs]) if specs else dg.Definitions()
    return dg.Definitions.merge(merged, dg.Definitions(resources=resources(profile), executor=executor(profile or current_profile())))


defs = build_definitions(load_specs())
