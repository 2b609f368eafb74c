"""Kiln's core: plain Python, no Dagster and no other Kiln package.

The spec model, settings, state paths and tag names, feature computation, contract rules, drift and performance
statistics, and the trainers. `serving/` runs on this alone; `resources/`, `assets/`, `sensors/` and
`platform_defs/` wrap it for Dagster.
"""
