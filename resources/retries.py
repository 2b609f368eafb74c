"""Retry policies for steps that talk to services (MLflow, S3, BentoML, the endpoint).

The prod profile retries with exponential backoff and jitter; locally a step fails at once (nothing to wait for).
``KILN_STEP_RETRIES`` / ``KILN_STEP_RETRY_DELAY`` override the count and the first delay.
"""

from __future__ import annotations

import dagster as dg


def service_retry_policy() -> dg.RetryPolicy | None:
    """The RetryPolicy of service-facing steps in the current profile (None: no retries)."""
    from kiln.settings import current_profile, step_retries

    retries, delay = step_retries(current_profile())
    if retries <= 0:
        return None
    return dg.RetryPolicy(max_retries=retries, delay=delay, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
