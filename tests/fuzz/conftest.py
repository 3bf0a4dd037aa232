"""The fuzzing tier's budget: the whole tier in about 15 s on a shared 2-core machine.

Under CI=true the examples are derandomized (the same vectors every run: a red CI is
then a regression, not a lucky draw); locally every run explores new ones, and the
failures found are replayed first from Hypothesis's example database.
NFKNOCK_FUZZ_SCALE=20 runs twenty times the examples, for a longer hunt by hand.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

CI = os.environ.get("CI") == "true"
SCALE = int(os.environ.get("NFKNOCK_FUZZ_SCALE") or 1)


def budget(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        derandomize=CI,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
