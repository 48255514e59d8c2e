"""What the benchmarks' smoke tests share."""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["need_go"]


def need_go() -> None:
    """Skip the calling test where no Go toolchain can build the load generator; in CI,
    where one must be, fail instead."""
    if shutil.which("go") is None and not os.environ.get("GO"):
        if os.environ.get("CI"):
            pytest.fail("Go is needed for the load generator")
        pytest.skip("no Go toolchain: the load generator cannot be built")
