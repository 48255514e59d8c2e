"""konnectivity-fast: a faster drop-in for Kubernetes Konnectivity's proxy-server and agent.

Importing the package checks the compiled core (``konnectivity_fast._compiled``).
"""

from __future__ import annotations

from konnectivity_fast._compiled import IMPLEMENTATION

__version__ = "0.1.0"
__all__ = ["IMPLEMENTATION", "__version__"]
