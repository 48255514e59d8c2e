"""The ``konnectivity-fast doctor`` command line: ``lb``, ``server`` and ``agent``.

Exit codes (for a CI step or a Kubernetes Job): 0 nothing wrong (warnings may be
printed), 1 something is wrong (the output says what and how to fix it), 2 the check
could not run (a bad argument, an unreadable file).
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]

EXIT_CANNOT = 2
DEFAULT_TRIES = 20
# Certificates ending sooner than this are a warning.
DEFAULT_WARN_DAYS = 30.0

DESCRIPTION = """\
Check a Konnectivity deployment from outside: the load balancer in front of the
proxy-servers' agent port (lb), or a running proxy-server's or proxy-agent's health,
readiness and metrics (server, agent). Works with upstream's programs as with ours.
Exit code 0: nothing wrong; 1: something is wrong; 2: the check could not run.
"""

EXIT_CODES = "exit codes: 0 nothing wrong (warnings aside), 1 something wrong, 2 cannot check"

LB_DESCRIPTION = """\
Connect to the agents' address (what agents use as --proxy-server-host and
--proxy-server-port) --tries times, as a proxy-agent connects: TLS with the agent's
certificate or token, ALPN h2, /AgentService/Connect. Read each answer's serverid and
servercount, then leave at once: the doctor sends no agent identifiers and a DRAIN with
its request, and never takes a dial (on upstream's servers, but for a window of
microseconds while the server registers the stream and reads the DRAIN).

Then say whether the balancer spreads agents over every replica (round robin and
complete), keeps them on one (sticky) or misses replicas (short), or whether the
servers' counts disagree, with what to change; and check each replica's certificate:
chain, names (SANs against --proxy-server-host) and expiry.
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "doctor",
        help="check a load balancer in front of proxy-servers, or a running server or agent",
        description=DESCRIPTION,
    )
    what = parser.add_subparsers(dest="doctor", required=True, metavar="{lb,server,agent}")
    lb = what.add_parser(
        "lb",
        help="is the agents' load-balanced address spreading agents over every server?",
        description=LB_DESCRIPTION,
        epilog=EXIT_CODES,
    )
    flags: list[tuple[str, str, str]] = [  # (flag, metavar, help)
        ("--proxy-server-host", "NAME", "the agents' TLS server name (default: HOST of --address)"),
        ("--ca-cert", "FILE", "CA bundle the servers' certificates chain to (agents' --ca-cert)"),
        ("--agent-cert", "FILE", "client certificate, as the agents' --agent-cert"),
        ("--agent-key", "FILE", "its key, as the agents' --agent-key"),
        ("--service-account-token-path", "FILE", "a token, for servers that check agents' tokens"),
    ]
    lb.add_argument("--address", required=True, metavar="HOST:PORT", help="the agents' address")
    lb.add_argument(
        "--tries", type=int, default=DEFAULT_TRIES, metavar="N",
        help="connections to make (default: %(default)s)",
    )  # fmt: skip
    for flag, metavar, text in flags:
        lb.add_argument(flag, default="", metavar=metavar, help=text)
    lb.add_argument(
        "--warn-days", type=float, default=DEFAULT_WARN_DAYS, metavar="DAYS",
        help="warn about certificates ending within this many days (default: %(default)g)",
    )  # fmt: skip
    for name, kind in (("server", "proxy-server"), ("agent", "proxy-agent")):
        port = "8092" if name == "server" else "8093"
        admin = "8095" if name == "server" else "8094"
        p = what.add_parser(
            name,
            help=f"read a running {kind}'s health, readiness and metrics",
            description=f"Read a running {kind}'s /healthz, /readyz and /metrics (its health "
            f"port, {port} by default) and report what is abnormal. Give --health once per "
            f"{kind} to compare them.",
            epilog=EXIT_CODES,
        )
        p.add_argument(
            "--health",
            action="append",
            required=True,
            metavar="HOST:PORT",
            help=f"the {kind}'s health address (repeat for several)",
        )
        p.add_argument(
            "--admin",
            action="append",
            default=[],
            metavar="HOST:PORT",
            help=f"also check its admin address ({admin} by default, on 127.0.0.1)",
        )


def run(args: argparse.Namespace) -> int:
    import uvloop

    from konnectivity_fast.cli.doctor import endpoints, lb

    if args.doctor == "lb":
        if args.tries < 1:
            print("doctor lb: --tries must be at least 1")
            return EXIT_CANNOT
        try:
            opts = lb.options(args)
            result: int = uvloop.run(lb.run_lb(opts))
        except (ValueError, OSError) as exc:
            print(f"doctor lb: {exc}")
            return EXIT_CANNOT
        return result
    if args.doctor == "server":
        problems = endpoints.check_servers(args.health, args.admin)
    else:
        problems = endpoints.check_agents(args.health, args.admin)
    verdict = "ok" if not problems else f"{problems} PROBLEM{'S' if problems > 1 else ''}"
    print(f"\ndoctor {args.doctor}: {verdict} (exit {1 if problems else 0})")
    return 1 if problems else 0
