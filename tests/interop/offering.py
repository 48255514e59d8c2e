"""Runs our proxy-server or proxy-agent offering extension tokens of the test's own, which
no user-visible flag can do (wire/contract.py: the offered set is an argument of each
program's ``main``):

    python tests/interop/offering.py server|agent TOKEN[,TOKEN...] [program flags...]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This checkout's package, as ``python -m konnectivity_fast.server`` run from the
# repository root finds it (a script's own folder comes first on sys.path instead).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from konnectivity_fast.cli import proxy_agent, proxy_server


def main(argv: list[str]) -> int:
    program, tokens, *flags = argv
    offered = frozenset(tokens.split(","))
    run = {"server": proxy_server.main, "agent": proxy_agent.main}[program]
    return run(flags, extensions=offered)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
