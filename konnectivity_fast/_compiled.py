"""Choose between the compiled core and the pure-Python codec, loudly.

The compiled extension ``konnectivity_fast._wire`` is required unless the pure fallback is
asked for with ``KONNECTIVITY_FAST_PURE=1``. A missing extension, or one built from sources
other than those in this checkout (a stale build), is an ``ImportError`` that says how to
fix it: silently running the slow or an old codec is worse than not starting.
``KONNECTIVITY_FAST_REQUIRE_COMPILED=1`` (set in images and CI) forbids the fallback.

The HTTP/2 engine has no pure twin; ``require_compiled()`` checks and returns the extension
for the layers that need it, whatever the codec choice. Package code calls it, then imports
the names it uses from ``konnectivity_fast._wire``: those are typed by ``_wire.pyi`` (a
``ModuleType`` is ``Any`` to mypy), and the check has run even when the pure codec was
chosen and nothing else loaded the extension.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from konnectivity_fast._build import source_digest, sources_present

PURE_ENV = "KONNECTIVITY_FAST_PURE"
REQUIRE_ENV = "KONNECTIVITY_FAST_REQUIRE_COMPILED"

_BUILD_HINT = (
    "build it with `make build` (or `python setup.py build_ext --inplace`), "
    f"or set {PURE_ENV}=1 to run the pure-Python codec"
)


def _import_extension() -> ModuleType:
    try:
        module = importlib.import_module("konnectivity_fast._wire")
    except ImportError as exc:
        raise ImportError(
            f"konnectivity_fast: the compiled core konnectivity_fast._wire is missing or "
            f"cannot load ({exc}); {_BUILD_HINT}"
        ) from exc
    if sources_present():
        expected = source_digest()
        built: str = module.SOURCE_DIGEST
        if built != expected:
            raise ImportError(
                f"konnectivity_fast: the compiled core is stale (built from sources "
                f"{built}, checkout has {expected}); {_BUILD_HINT}"
            )
    return module


def _choose() -> ModuleType | None:
    pure = os.environ.get(PURE_ENV, "") == "1"
    if pure and os.environ.get(REQUIRE_ENV, "") == "1":
        raise ImportError(f"konnectivity_fast: {PURE_ENV}=1 conflicts with {REQUIRE_ENV}=1")
    if pure:
        return None
    return _import_extension()


_extension = _choose()
IMPLEMENTATION = "pure" if _extension is None else "compiled"


def codec_module() -> ModuleType:
    """The module implementing the codec API chosen at import."""
    if _extension is not None:
        return _extension
    return importlib.import_module("konnectivity_fast.wire._codec")


def require_compiled() -> ModuleType:
    """The compiled extension, for the HTTP/2 engine (which has no pure twin); an
    ``ImportError`` saying how to fix it when it is missing or stale."""
    return _extension if _extension is not None else _import_extension()
