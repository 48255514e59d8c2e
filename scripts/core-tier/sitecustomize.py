"""Load ``konnectivity_fast._wire`` from the build named by ``KF_CORE_TIER_SO``.

``scripts/core-tier.sh`` puts this folder on ``PYTHONPATH``, so every Python process it
starts (and their Python children, which inherit the environment) runs the debug or asan
build of the compiled core while the rest of the package comes from the checkout as usual.
The release build beside the sources is never touched. The package still compares the
loaded core's source digest with the checkout, so a stale tier build fails loudly.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

_NAME = "konnectivity_fast._wire"
_PATH = os.environ.get("KF_CORE_TIER_SO", "")


class _TierCoreFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _NAME:
            return None
        if not os.path.isfile(_PATH):
            raise ImportError(f"KF_CORE_TIER_SO={_PATH!r}: no such build", name=fullname)
        return importlib.util.spec_from_file_location(fullname, _PATH)


if _PATH:
    sys.meta_path.insert(0, _TierCoreFinder())
