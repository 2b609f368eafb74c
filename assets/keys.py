"""The asset-key contract (ARCHITECTURE.md): every pipeline ``<p>`` has these eight assets."""

from __future__ import annotations

STAGES = ("raw", "validated", "features", "model", "champion", "bento", "endpoint", "predictions")


def key(pipeline: str, stage: str) -> list[str]:
    """The asset key path of a stage, e.g. ``["fraud", "raw"]``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}', expected one of {', '.join(STAGES)}")
    return [pipeline, stage]
