"""What every stage's asset shares: its key, group, op tags (`dagster-k8s/config`) and pool, from the spec."""

from __future__ import annotations

from typing import Any

from kiln import steps
from kiln.keys import key
from kiln.spec import PipelineSpec


def op_args(spec: PipelineSpec, stage: str, **op_tags: str) -> dict[str, Any]:
    """``group_name``, ``op_tags`` and ``pool`` of the step that computes `<p>/<stage>` (also for a multi-asset)."""
    return {"group_name": spec.name, "op_tags": {**op_tags, **steps.op_tags(spec, stage)}, "pool": steps.pool(spec, stage)}


def asset_args(spec: PipelineSpec, stage: str, **op_tags: str) -> dict[str, Any]:
    """``key`` plus :func:`op_args` of `<p>/<stage>`; extra op tags are added to the step's config."""
    return {"key": key(spec.name, stage), **op_args(spec, stage, **op_tags)}
