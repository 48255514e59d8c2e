"""``python -m konnectivity_fast.server``: the ``proxy-server`` program."""

from __future__ import annotations

import sys

from konnectivity_fast.cli.proxy_server import main

if __name__ == "__main__":
    sys.exit(main())
