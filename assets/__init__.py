"""Asset factories, one module per stage. Each factory takes a validated spec and returns Dagster objects."""
