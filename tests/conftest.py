"""Hypothesis profiles, chosen with the HYPOTHESIS_PROFILE environment variable (default "dev").

    dev      a quick local run
    ci       bounded and derandomized, so CI runs are fast and repeatable
    nightly  many more examples, for a scheduled job: HYPOTHESIS_PROFILE=nightly pytest
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=20, deadline=None)
settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "nightly", max_examples=500, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
