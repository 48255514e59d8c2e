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
  vendored           release, with the pinned libnghttp2 compiled in (below): the engine
                     tests against the wheel's nghttp2 without building a wheel
The debug, asan and vendored tiers are never built in place: their C files and objects go
to ``build/<tier>/`` and the extension to ``build/<tier>/lib/``, so the release build beside
the sources is never replaced; ``scripts/core-tier.sh`` builds one and runs a command with
it (``make debug``, ``make asan``).

``KF_VENDOR_NGHTTP2=1`` (any tier; ``make wheel`` sets it) compiles the pinned libnghttp2
sources fetched by ``scripts/fetch-nghttp2.sh`` into the extension instead of linking the
system library, so a wheel runs where no libnghttp2 is installed. ``KF_NGHTTP2_SRC`` names
another nghttp2 source tree (one with ``lib/`` and ``CMakeLists.txt``) to build against
instead of the pin, to try the engine with another release. The vendored library's symbols
are hidden (``-fvisibility=hidden``): a system libnghttp2 loaded into the same process by
something else can neither replace nor be replaced by ours.
"""

from __future__ import annotations

import glob
import os
import re
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


TIERS = ("release", "debug", "asan", "vendored")
TIER = os.environ.get("KF_BUILD", "") or "release"
if TIER not in TIERS:
    sys.exit(f"KF_BUILD={TIER!r}: expected one of {', '.join(TIERS)}")
# Where a tier's generated C, objects and digest stamp go; release keeps its C file beside
# the sources (konnectivity_fast/_wire.c) and its stamp in build/.
TIER_DIR = "build" if TIER == "release" else os.path.join("build", TIER)
VENDORED = TIER == "vendored" or os.environ.get("KF_VENDOR_NGHTTP2", "") == "1"
# The configuration a distribution's build of nghttp2 gets from its configure step, for a
# glibc Linux: network byte order helpers, and a monotonic clock for the rate limiters
# (stream resets, glitches) instead of time(2).
NGHTTP2_CONFIG: list[tuple[str, str | None]] = [
    ("NGHTTP2_STATICLIB", None),
    ("HAVE_ARPA_INET_H", "1"),
    ("HAVE_NETINET_IN_H", "1"),
    ("HAVE_CLOCK_GETTIME", "1"),
    ("HAVE_DECL_CLOCK_MONOTONIC", "1"),
]


class Nghttp2:
    """Where the core gets libnghttp2 from: compile and link options, and a label for the
    build stamp (a change of library forces a rebuild)."""

    def __init__(self) -> None:
        self.sources: list[str] = []
        self.include_dirs: list[str] = []
        self.compile: list[str] = []
        self.link: list[str] = []
        self.macros: list[tuple[str, str | None]] = []
        self.license = ""
        if VENDORED:
            self._vendored()
        else:
            self._system()

    def _system(self) -> None:
        self.compile = [f for f in pkg_config("--cflags") if not f.startswith("-I")]
        self.include_dirs = [f[2:] for f in pkg_config("--cflags-only-I")]
        self.link = pkg_config("--libs")
        self.label = "system " + " ".join(pkg_config("--modversion"))

    def _vendored(self) -> None:
        src = os.environ.get("KF_NGHTTP2_SRC", "")
        if not src:
            fetch = os.path.join("scripts", "fetch-nghttp2.sh")
            src = subprocess.run([fetch], check=True, stdout=subprocess.PIPE, text=True)
            src = src.stdout.strip()
        with open(os.path.join(src, "CMakeLists.txt")) as f:
            found = re.search(r"project\(nghttp2 VERSION (\d+)\.(\d+)\.(\d+)", f.read())
        if not found:
            sys.exit(f"{src}/CMakeLists.txt: no `project(nghttp2 VERSION x.y.z` line")
        major, minor, patch = (int(n) for n in found.groups())
        version = f"{major}.{minor}.{patch}"
        # nghttp2ver.h is generated by nghttp2's own build from nghttp2ver.h.in.
        gen = os.path.join(TIER_DIR, f"nghttp2-{version}", "include")
        os.makedirs(os.path.join(gen, "nghttp2"), exist_ok=True)
        lib = os.path.join(src, "lib")
        with open(os.path.join(lib, "includes", "nghttp2", "nghttp2ver.h.in")) as f:
            header = f.read()
        header = header.replace("@PACKAGE_VERSION@", version).replace(
            "@PACKAGE_VERSION_NUM@", f"0x{major:02x}{minor:02x}{patch:02x}"
        )
        with open(os.path.join(gen, "nghttp2", "nghttp2ver.h"), "w") as f:
            f.write(header)
        # Relative to setup.py: setuptools refuses absolute source paths in a wheel build.
        here = os.path.dirname(os.path.abspath(__file__))
        self.sources = sorted(os.path.relpath(c, here) for c in glob.glob(os.path.join(lib, "*.c")))
        # Ours first: the system's /usr/include/nghttp2 must not be picked up instead.
        self.include_dirs = [gen, os.path.join(lib, "includes"), lib]
        self.compile = ["-fvisibility=hidden"]
        self.macros = NGHTTP2_CONFIG
        self.license = os.path.join(src, "COPYING")
        self.label = f"vendored {version} from {os.path.abspath(src)}"


NGHTTP2 = Nghttp2()


def extensions() -> list[Extension]:
    from Cython.Build import cythonize

    include_dirs = ["csrc", *NGHTTP2.include_dirs]
    extra_compile = ["-O2", "-Wall", "-Wno-unused-function", *NGHTTP2.compile]
    extra_link = list(NGHTTP2.link)
    macros: list[tuple[str, str | None]] = [
        ("KF_SOURCE_DIGEST", f'"{source_digest()}"'),
        *NGHTTP2.macros,
    ]
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
        ["konnectivity_fast/_wire.pyx", *NGHTTP2.sources],
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
        digest = f"{source_digest()} nghttp2 {NGHTTP2.label}"
        try:
            with open(DIGEST_STAMP) as f:
                self.force = self.force or f.read().strip() != digest
        except OSError:
            self.force = True
        super().run()
        if NGHTTP2.license and not self.inplace:
            # nghttp2's MIT licence asks for its notice in copies: it travels in the wheel.
            target = os.path.join(self.build_lib, "konnectivity_fast", "NGHTTP2-COPYING")
            self.copy_file(NGHTTP2.license, target)
        os.makedirs(TIER_DIR, exist_ok=True)
        with open(DIGEST_STAMP, "w") as f:
            f.write(digest)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
