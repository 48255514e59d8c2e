"""Shared test configuration: hypothesis profiles and the ``codec`` twin fixture.

Hypothesis profiles: "ci" (the default, ~300 examples per property) and "slow" (5000),
chosen with ``HYPOTHESIS_PROFILE=slow``. Neither has a deadline: the pure twin and the
official runtime are timed by the machine, not by the property.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
from hypothesis import settings

from tests.support.oracle import TWINS, load_twin

settings.register_profile("ci", max_examples=300, deadline=None)
settings.register_profile("slow", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", params=TWINS)
def codec(request: pytest.FixtureRequest) -> ModuleType:
    """Each codec twin in turn: ``konnectivity_fast.wire._codec`` ("pure") and
    ``konnectivity_fast._wire`` ("compiled"). A compiled twin that cannot be imported
    fails its tests: it is never skipped."""
    try:
        return load_twin(request.param)
    except ImportError as exc:
        pytest.fail(f"the {request.param} codec twin is unavailable: {exc}", pytrace=False)
