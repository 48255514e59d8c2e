"""klog's verbosity as Python logging levels, for every layer: ``V(n)`` is ``INFO - 2n``
(at least 1), so ``log.log(V(2), ...)`` shows with ``-v=2`` and above (cli/klog.py sets the
threshold from ``-v``). It lives at the package root because server/ and agent/ log at
klog levels but may not import cli/."""

from __future__ import annotations

import logging

__all__ = ["V"]


def V(n: int) -> int:
    """The Python logging level of klog's ``V(n)``: ``INFO - 2n``, at least 1."""
    return max(1, logging.INFO - 2 * max(0, n))
