"""Seeded generators of example source data, one module per example pipeline."""
