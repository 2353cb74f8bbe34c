"""Shared test settings: a modest Hypothesis profile (2-core machine, several suites in parallel).

The default dtype of torch is NOT changed: every reference converts to float64 explicitly.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "lipverify",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("lipverify")
