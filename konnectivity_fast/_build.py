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

import hashlib
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_PACKAGE = Path(__file__).resolve().parent

#: Files whose content defines the compiled extension, relative to the project root.
_SOURCE_GLOBS = ("csrc/*.pxi", "csrc/*.pxd", "csrc/*.h", "csrc/*.c", "konnectivity_fast/_wire.pyx")


def source_files() -> list[Path]:
    files: list[Path] = []
    for pattern in _SOURCE_GLOBS:
        files.extend(sorted(_ROOT.glob(pattern)))
    return files


def sources_present() -> bool:
    return (_ROOT / "csrc").is_dir() and (_PACKAGE / "_wire.pyx").is_file()


def source_digest() -> str:
    h = hashlib.sha256()
    for path in source_files():
        h.update(path.relative_to(_ROOT).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]
