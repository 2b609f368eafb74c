"""Retry policies for steps that talk to services (MLflow, S3, BentoML, the endpoint).

The prod profile retries with exponential backoff and jitter; locally a step fails at once (nothing to wait for).
``KILN_STEP_RETRIES`` / ``KILN_STEP_RETRY_DELAY`` override the count and the first delay.
"""

from __future__ import annotations

import os

import dagster as dg

DEFAULT_RETRIES = 3
DEFAULT_DELAY_S = 2.0


def service_retry_policy() -> dg.RetryPolicy | None:
    """The RetryPolicy of service-facing steps in the current profile (None: no retries)."""
    from platform_defs.profiles import current_profile

    retries = int(os.environ.get("KILN_STEP_RETRIES", DEFAULT_RETRIES if current_profile() == "prod" else 0))
    if retries <= 0:
        return None
    delay = float(os.environ.get("KILN_STEP_RETRY_DELAY", DEFAULT_DELAY_S))
    return dg.RetryPolicy(max_retries=retries, delay=delay, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
