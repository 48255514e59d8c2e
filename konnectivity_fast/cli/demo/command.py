"""The ``konnectivity-fast demo`` command line.

Exit codes: 0 everything worked (or ``--stop`` stopped what was kept); 1 a step failed
(the output says which, and where the programs' logs are); 2 the command line or this
machine cannot run the asked topology (it says what is missing); 130 interrupted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from konnectivity_fast.cli.demo import netns
from konnectivity_fast.cli.demo.procs import STATE_FILE, stop_kept
from konnectivity_fast.cli.demo.report import Out

__all__ = ["add_parser", "run"]

EXIT_CANNOT = 2
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Run the real proxy-server and proxy-agent programs on this machine and carry requests
through them, as kube-apiserver would, in both frontend modes.

Started as processes: two proxy-servers (--mode=grpc and --mode=http-connect, frontends on
Unix sockets), a load balancer in front of their agent ports, two proxy-agents that each
hold both servers through it, and a small HTTP backend standing in for a kubelet, with a
throwaway CA and mTLS certificates made on the spot. Then: one tunnel per mode carrying
GET /healthz, 200 round trips, a 64 MiB download (every byte checked) and 20 tunnel
set-ups; which server and agents carried them; each program's /healthz, /readyz and
counters from /metrics. Everything is stopped at the end, also on Ctrl-C or a failure.
"""

EPILOG = """\
topologies:
  local    everything on 127.0.0.1; the demo's own balancer stands in for the load balancer
  remote   the talk's picture, in network namespaces (needs root, `ip` and `haproxy`): the
           control plane (servers, and this demo as kube-apiserver) and two workers (an agent
           and a kubelet stand-in each) on separate networks, the agents dialling out through
           HAProxy; nothing on the control plane can reach a worker except through the
           tunnels, and each server routes a dial to the agent of the worker it names
           (--proxy-strategies=destHost,default)

exit codes: 0 all worked, 1 a step failed, 2 cannot run here (says what is missing),
130 interrupted
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the real proxy-server and proxy-agent, carry requests through both modes",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--topology",
        choices=("local", "remote"),
        default="local",
        help="where the programs run (below; default: local)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave everything running at the end and print commands to try by hand",
    )
    parser.add_argument(
        "--stop",
        metavar="DIR",
        help="stop what a --keep run left running (the folder it printed), and exit",
    )


def _undo(extra: dict[str, object]) -> None:
    if extra.get("topology") == "remote":
        netns.down(netns.Network())


def _stop(folder: Path, out: Out) -> int:
    if not (folder / STATE_FILE).is_file():
        out.line(f"demo --stop: {folder} holds no {STATE_FILE}: nothing kept there")
        return EXIT_CANNOT
    stopped, gone = stop_kept(folder, _undo)
    note = f" ({gone} had already exited)" if gone else ""
    out.line(f"stopped {stopped} processes{note}; logs stay in {folder}")
    return 0


def run(args: argparse.Namespace) -> int:
    out = Out()
    if args.stop:
        return _stop(Path(args.stop), out)
    if args.topology == "remote":
        missing = netns.missing_requirements()
        if missing:
            out.line("demo --topology=remote needs what this machine lacks:")
            for item in missing:
                out.line(f"  - {item}")
            out.line("(plain `konnectivity-fast demo` runs the local topology without them)")
            return EXIT_CANNOT
    import uvloop

    from konnectivity_fast.cli.demo.run import DemoOptions, run_demo

    try:
        result: int = uvloop.run(run_demo(DemoOptions(args.topology, args.keep), out))
    except KeyboardInterrupt:  # a Ctrl-C after the demo's own clean-up had finished
        return EXIT_INTERRUPTED
    return result
