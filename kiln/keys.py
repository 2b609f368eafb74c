"""The asset-key contract (ARCHITECTURE.md): every pipeline ``<p>`` has these nine assets."""

from __future__ import annotations

STAGES = ("raw", "validated", "features", "model", "champion", "bento", "image", "endpoint", "predictions")
EXTRA_STAGES = ("quarantine", "labels")  # beyond the contract: rejected rows with their reasons; delayed labels (spec labels:)


def key(pipeline: str, stage: str) -> list[str]:
    """The asset key path of a stage, e.g. ``["fraud", "raw"]``."""
    if stage not in STAGES and stage not in EXTRA_STAGES:
        raise ValueError(f"unknown stage '{stage}', expected one of {', '.join(STAGES)}")
    return [pipeline, stage]
