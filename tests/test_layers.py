"""Dependencies point down only, checked on the source.

Each layer (a subpackage of ``konnectivity_fast``) lists the project packages it may
import; sans-IO layers may not import I/O or clock modules at all. Every subpackage is a
layer here and every layer here is a subpackage, so a new layer cannot escape the check
and a removed one cannot linger in it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "konnectivity_fast"

# layer -> project modules it may import (prefixes); "" is the package root's own modules.
ALLOWED: dict[str, tuple[str, ...]] = {
    "metrics": ("konnectivity_fast.metrics",),
    # _lazy: names loaded on first use; imports nothing of the project.
    "kube": ("konnectivity_fast.kube", "konnectivity_fast._lazy"),
    # _wire is the compiled core (the codec's fast twin and the HTTP/2 engine), imported for
    # its names after _compiled has checked the build.
    "wire": (
        "konnectivity_fast.wire",
        "konnectivity_fast._compiled",
        "konnectivity_fast._build",
        "konnectivity_fast._wire",
    ),
    "tunnel": ("konnectivity_fast.wire", "konnectivity_fast.tunnel", "konnectivity_fast._lazy"),
    "transport": (
        "konnectivity_fast.wire",
        "konnectivity_fast.transport",
        "konnectivity_fast._compiled",
        "konnectivity_fast._wire",
    ),
    "server": (
        "konnectivity_fast.wire",
        "konnectivity_fast.tunnel",
        "konnectivity_fast.transport",
        "konnectivity_fast.server",
        "konnectivity_fast.metrics",
        "konnectivity_fast.kube",
        "konnectivity_fast._compiled",
        "konnectivity_fast.verbosity",  # klog levels; imports nothing of the project
    ),
    "agent": (
        "konnectivity_fast.wire",
        "konnectivity_fast.tunnel",
        "konnectivity_fast.transport",
        "konnectivity_fast.agent",
        "konnectivity_fast.metrics",
        "konnectivity_fast.kube",
        "konnectivity_fast._compiled",
        "konnectivity_fast.verbosity",  # klog levels; imports nothing of the project
    ),
    # The top: the programs' entry points and options may use every layer (and the
    # package root's version); nothing below imports cli/ (see __main__.py below).
    "cli": ("konnectivity_fast",),
}
# Sans-IO layers: no sockets, no event loop, no clock.
NO_IO = {"wire", "tunnel"}
IO_MODULES = {"asyncio", "socket", "ssl", "time", "uvloop", "selectors", "threading"}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def layer_files() -> list[tuple[str, Path]]:
    return [(layer, path) for layer in ALLOWED for path in sorted((PACKAGE / layer).rglob("*.py"))]


@pytest.mark.parametrize(("layer", "path"), layer_files(), ids=lambda v: str(v).split("/")[-1])
def test_layer_imports(layer: str, path: Path) -> None:
    allowed = ALLOWED[layer]
    if path.name == "__main__.py":
        # `python -m konnectivity_fast.<layer>` is an entry point, above every layer: it
        # may start the command-line program of its layer.
        allowed = (*allowed, "konnectivity_fast.cli")
    for name in imports(path):
        if name.startswith("konnectivity_fast"):
            assert name.startswith(allowed), f"{path.name} ({layer}/) imports {name}"
        if layer in NO_IO:
            assert name.split(".")[0] not in IO_MODULES, f"{path.name} ({layer}/) imports {name}"


def test_layers_exist() -> None:
    assert layer_files(), "no layer found: the checker would pass vacuously"
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(ALLOWED), "a subpackage without a layer rule, or a rule for none"
