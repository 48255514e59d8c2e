"""Packages whose names are loaded on first use (PEP 562).

A package that re-exports its modules' names (``from konnectivity_fast.tunnel import
Router``) would otherwise import every module of it as soon as any one of them is
imported: ``tunnel.flow`` would bring the whole proxy-server router into the agent, and
``kube.labels`` the whole Kubernetes client. Every module costs resident memory for as long
as the process runs (the agent's budget: docs/architecture.md, "The agent's imports"), so
such a package lists where each name lives and imports that module when the name is first
read. Its ``if TYPE_CHECKING:`` imports give mypy the same names with their types.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(
    package: str, exports: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for `package`, given ``{module: (names...)}``.

    A name is looked up in its module at first use, then kept in the package's namespace,
    so later reads cost nothing."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        namespace = vars(importlib.import_module(package))
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
