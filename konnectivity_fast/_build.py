"""Identity of the compiled core's sources, shared by ``setup.py`` and the package.

``source_digest()`` hashes every file the ``_wire`` extension is built from. ``setup.py``
compiles the digest into the extension; at import, the package recomputes it from the
checkout and refuses a build whose digest differs (a stale ``.so`` silently running old
framing code is the failure this prevents). In an installed wheel the sources are absent
and the check is skipped: the wheel was built from exactly what it ships.

This module imports only the standard library, so ``setup.py`` can load it before the
package is importable.
"""

from __future__ import annotations

import glob
import os

# Plain os.path, not pathlib, and hashlib only when a digest is computed: every program
# imports this module, and an installed wheel never computes one (docs/architecture.md,
# "The agent's imports").
_PACKAGE = os.path.dirname(os.path.realpath(__file__))
_ROOT = os.path.dirname(_PACKAGE)

#: Files whose content defines the compiled extension, relative to the project root.
_SOURCE_GLOBS = ("csrc/*.pxi", "csrc/*.pxd", "csrc/*.h", "csrc/*.c", "konnectivity_fast/_wire.pyx")


def source_files() -> list[str]:
    """The files, relative to the project root, with ``/`` separators, in digest order."""
    files: list[str] = []
    for pattern in _SOURCE_GLOBS:
        found = glob.glob(os.path.join(_ROOT, pattern))
        files.extend(sorted(os.path.relpath(f, _ROOT).replace(os.sep, "/") for f in found))
    return files


def sources_present() -> bool:
    return os.path.isdir(os.path.join(_ROOT, "csrc")) and os.path.isfile(
        os.path.join(_PACKAGE, "_wire.pyx")
    )


def source_digest() -> str:
    import hashlib

    h = hashlib.sha256()
    for name in source_files():
        h.update(name.encode())
        h.update(b"\0")
        with open(os.path.join(_ROOT, name), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()[:16]
