"""``konnectivity-fast``: tools that upstream's binaries lack.

``konnectivity-fast demo``     runs the real proxy-server and proxy-agent programs and carries
                               requests through both frontends (``cli/demo/``).
``konnectivity-fast doctor``   checks a load balancer in front of proxy-servers, or a running
                               server's or agent's health (``cli/doctor/``).
``konnectivity-fast tunnels``  shows a proxy-server's or proxy-agent's open tunnels, read
                               from its admin port (``cli/tunnels.py``).
``konnectivity-fast version``  prints the version, the codec in use and the compiled core's
                               source digest.

Each subcommand lives in its own module, with ``add_parser(sub)`` and ``run(args)``; this
module only lists them, and imports one only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from konnectivity_fast import IMPLEMENTATION, __version__


def _version(args: argparse.Namespace) -> int:
    from konnectivity_fast._compiled import require_compiled

    require_compiled()
    from konnectivity_fast._wire import SOURCE_DIGEST

    print(f"konnectivity-fast {__version__}")
    print(f"codec: {IMPLEMENTATION}; compiled core sources {SOURCE_DIGEST}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from konnectivity_fast.cli import tunnels
    from konnectivity_fast.cli.demo import command as demo
    from konnectivity_fast.cli.doctor import command as doctor

    parser = argparse.ArgumentParser(
        prog="konnectivity-fast",
        description="Tools beside the proxy-server and proxy-agent drop-ins.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # The subcommand table: name -> (adds its parser, runs it).
    demo.add_parser(sub)
    doctor.add_parser(sub)
    tunnels.add_parser(sub)
    sub.add_parser("version", help="version, codec and build information")
    runners = {"demo": demo.run, "doctor": doctor.run, "tunnels": tunnels.main, "version": _version}
    args = parser.parse_args(argv)
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
