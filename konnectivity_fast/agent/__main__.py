"""``python -m konnectivity_fast.agent``: the ``proxy-agent`` program."""

from __future__ import annotations

import sys

from konnectivity_fast.cli.proxy_agent import main

if __name__ == "__main__":
    sys.exit(main())
