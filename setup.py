"""Build the compiled core, ``konnectivity_fast._wire``.

The extension is one Cython hub (``konnectivity_fast/_wire.pyx``) that includes its parts
from ``csrc/`` and links the system libnghttp2, found with pkg-config. A digest of every
source file is compiled in, so the package can refuse to import a stale build
(``konnectivity_fast/_build.py``).

Environment knobs:
  KF_DEBUG=1          compile in bounds/state assertions and line tracing
  KF_SANITIZE=address,undefined   build with sanitizers (for ``make asan``)
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


def extensions() -> list[Extension]:
    from Cython.Build import cythonize

    debug = os.environ.get("KF_DEBUG") == "1"
    sanitize = os.environ.get("KF_SANITIZE", "")
    cflags = [f for f in pkg_config("--cflags") if not f.startswith("-I")]
    include_dirs = ["csrc"] + [f[2:] for f in pkg_config("--cflags-only-I")]
    extra_compile = ["-O2", "-Wall", "-Wno-unused-function", *cflags]
    extra_link = pkg_config("--libs")
    if debug:
        extra_compile += ["-O0", "-g", "-UNDEBUG"]
    if sanitize:
        extra_compile += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
        extra_link += [f"-fsanitize={sanitize}"]
    ext = Extension(
        "konnectivity_fast._wire",
        ["konnectivity_fast/_wire.pyx"],
        include_dirs=include_dirs,
        extra_compile_args=extra_compile,
        extra_link_args=extra_link,
        define_macros=[
            ("KF_SOURCE_DIGEST", f'"{source_digest()}"'),
            ("KF_DEBUG", "1" if debug else "0"),
        ],
    )
    return cythonize(
        [ext],
        language_level=3,
        include_path=["csrc"],
        compiler_directives={
            "boundscheck": debug,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
        quiet=True,
    )


DIGEST_STAMP = os.path.join("build", "kf-source-digest")


class BuildExt(build_ext):
    """Rebuild whenever the sources' digest changed, even when no file is newer than the
    generated C (a deleted or reverted part would otherwise leave a stale build)."""

    def run(self) -> None:
        digest = source_digest()
        try:
            with open(DIGEST_STAMP) as f:
                self.force = self.force or f.read().strip() != digest
        except OSError:
            self.force = True
        super().run()
        os.makedirs("build", exist_ok=True)
        with open(DIGEST_STAMP, "w") as f:
            f.write(digest)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
