"""Build the compiled core, ``konnectivity_fast._wire``.

The extension is one Cython hub (``konnectivity_fast/_wire.pyx``) that includes its parts
from ``csrc/`` and links the system libnghttp2, found with pkg-config. A digest of every
source file is compiled in, so the package can refuse to import a stale build
(``konnectivity_fast/_build.py``).

``KF_BUILD`` chooses the tier (``make build``, ``make debug``, ``make asan``):
  release (default)  optimised, in place (``build_ext --inplace``), what the package runs
  debug              Cython line tracing (``linetrace`` with ``CYTHON_TRACE`` and
                     ``CYTHON_TRACE_NOGIL``: coverage tools and ``sys.settrace`` see lines
                     of ``csrc/``), Cython bounds checks, and C asserts (``NDEBUG``
                     undefined: the ``assert()``s of CPython's headers and of Cython's
                     generated helpers are checked), at ``-O0 -g``
  asan               AddressSanitizer and UndefinedBehaviorSanitizer (any report aborts),
                     with the C asserts of ``debug``
The debug and asan tiers are never built in place: their C files and objects go to
``build/<tier>/`` and the extension to ``build/<tier>/lib/``, so the release build beside
the sources is never replaced; ``scripts/core-tier.sh`` builds one and runs a command with
it (``make debug``, ``make asan``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "konnectivity_fast"))
from _build import source_digest


def pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(
            ["pkg-config", *args, "libnghttp2"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(
            "konnectivity-fast needs libnghttp2's headers (Debian: apt-get install "
            f"libnghttp2-dev pkg-config); pkg-config failed: {exc}"
        )
    return shlex.split(out)


TIERS = ("release", "debug", "asan")
TIER = os.environ.get("KF_BUILD", "") or "release"
if TIER not in TIERS:
    sys.exit(f"KF_BUILD={TIER!r}: expected one of {', '.join(TIERS)}")
# Where a tier's generated C, objects and digest stamp go; release keeps its C file beside
# the sources (konnectivity_fast/_wire.c) and its stamp in build/.
TIER_DIR = "build" if TIER == "release" else os.path.join("build", TIER)


def extensions() -> list[Extension]:
    from Cython.Build import cythonize

    cflags = [f for f in pkg_config("--cflags") if not f.startswith("-I")]
    include_dirs = ["csrc"] + [f[2:] for f in pkg_config("--cflags-only-I")]
    extra_compile = ["-O2", "-Wall", "-Wno-unused-function", *cflags]
    extra_link = pkg_config("--libs")
    macros: list[tuple[str, str | None]] = [("KF_SOURCE_DIGEST", f'"{source_digest()}"')]
    directives = {
        "boundscheck": False,
        "wraparound": False,
        "cdivision": True,
        "embedsignature": True,
    }
    if TIER != "release":
        # Later flags win: -O0/-O1 over -O2, -UNDEBUG over Python's own -DNDEBUG.
        extra_compile += ["-g", "-UNDEBUG", "-fno-omit-frame-pointer"]
    if TIER == "debug":
        extra_compile += ["-O0"]
        directives.update(boundscheck=True, linetrace=True)
        macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
    if TIER == "asan":
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        extra_compile += ["-O1", *sanitize]
        extra_link += sanitize
    ext = Extension(
        "konnectivity_fast._wire",
        ["konnectivity_fast/_wire.pyx"],
        include_dirs=include_dirs,
        extra_compile_args=extra_compile,
        extra_link_args=extra_link,
        define_macros=macros,
    )
    return cythonize(
        [ext],
        language_level=3,
        include_path=["csrc"],
        compiler_directives=directives,
        build_dir=None if TIER == "release" else os.path.join(TIER_DIR, "c"),
        quiet=True,
    )


DIGEST_STAMP = os.path.join(TIER_DIR, "kf-source-digest")


class BuildExt(build_ext):
    """Rebuild whenever the sources' digest changed, even when no file is newer than the
    generated C (a deleted or reverted part would otherwise leave a stale build). Only the
    release tier may be built in place."""

    def finalize_options(self) -> None:
        if TIER != "release":
            self.build_lib = self.build_lib or os.path.join(TIER_DIR, "lib")
            self.build_temp = self.build_temp or os.path.join(TIER_DIR, "tmp")
        super().finalize_options()

    def run(self) -> None:
        if self.inplace and TIER != "release":
            sys.exit(
                f"KF_BUILD={TIER} is never built in place (it would replace the release "
                f"build): use scripts/core-tier.sh {TIER}"
            )
        digest = source_digest()
        try:
            with open(DIGEST_STAMP) as f:
                self.force = self.force or f.read().strip() != digest
        except OSError:
            self.force = True
        super().run()
        os.makedirs(TIER_DIR, exist_ok=True)
        with open(DIGEST_STAMP, "w") as f:
            f.write(digest)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
