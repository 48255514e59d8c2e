"""``konnectivity-fast doctor lb``: through the agents' load-balanced address, N
connections as an agent makes them (``probe``), the answers tallied and judged
(``verdict``), each replica's certificate checked (``tlscheck``).

Exit code: 0 when the balancer spreads agents over every replica and the certificates
are good (warnings, such as a certificate ending soon, do not fail it); 1 otherwise.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from konnectivity_fast.cli.doctor import probe as probe_mod
from konnectivity_fast.cli.doctor.probe import Attempt, ProbeConfig
from konnectivity_fast.cli.doctor.tlscheck import SECONDS_PER_DAY, agent_cert_expiry, matches
from konnectivity_fast.cli.doctor.verdict import judge

__all__ = ["LbOptions", "run_lb"]

# Long verdicts are wrapped at this width.
WIDTH = 92


@dataclass(frozen=True)
class LbOptions:
    address: str
    tries: int
    server_name: str
    ca_cert: str
    agent_cert: str
    agent_key: str
    token_path: str
    warn_days: float


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; raises ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--address wants HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def options(args: argparse.Namespace) -> LbOptions:
    host, _ = split_address(args.address)
    return LbOptions(
        address=args.address,
        tries=args.tries,
        server_name=args.proxy_server_host or host,
        ca_cert=args.ca_cert,
        agent_cert=args.agent_cert,
        agent_key=args.agent_key,
        token_path=args.service_account_token_path,
        warn_days=args.warn_days,
    )


def _token(path: str) -> str:
    if not path:
        return ""
    # As the agent: the file as it is, less trailing whitespace (a newline would be an
    # invalid header value).
    return Path(path).read_text(encoding="latin-1").rstrip()


async def run_lb(opts: LbOptions) -> int:
    host, port = split_address(opts.address)
    agent_id = probe_mod.doctor_agent_id()
    config = ProbeConfig(
        host,
        port,
        opts.server_name,
        probe_mod.ssl_context(opts.ca_cert, opts.agent_cert, opts.agent_key),
        agent_id,
        _token(opts.token_path),
    )
    print(
        f"konnectivity-fast doctor lb: {opts.tries} connections to {opts.address}, as a proxy-agent"
    )
    print(f"  makes them (TLS name {opts.server_name}), as agent {agent_id}, never taking a dial")
    attempts: list[Attempt] = []
    started = time.monotonic()
    for i in range(opts.tries):
        attempts.append(await probe_mod.probe(config))
        if time.monotonic() - started > 1.0:  # progress, for a slow or distant balancer
            print(f"\r  {i + 1}/{opts.tries} connections", end="", flush=True)
    if time.monotonic() - started > 1.0:
        print()
    problems = _report_answers(attempts)
    problems += _report_certificates(attempts, opts)
    verdict = judge(attempts)
    print()
    print(textwrap.fill(f"Verdict: {verdict.kind.upper()}: {verdict.summary}.", WIDTH))
    if verdict.fix:
        print(
            textwrap.fill(
                f"Fix: {verdict.fix}.", WIDTH, initial_indent="  ", subsequent_indent="  "
            )
        )
    failed = problems or not verdict.ok
    print(f"\ndoctor lb: {'PROBLEMS FOUND' if failed else 'ok'} (exit {1 if failed else 0})")
    return 1 if failed else 0


def _report_answers(attempts: Sequence[Attempt]) -> int:
    """Print the tally; the number of problems (failed tries)."""
    print()
    print(f"  {'server ID':<40} {'servercount':>11} {'tries':>6}")
    tally = Counter(a.server_id for a in attempts if a.server_id)
    counts = {a.server_id: a.server_count for a in attempts if a.server_id}
    for server_id, n in sorted(tally.items()):
        print(f"  {server_id:<40} {counts[server_id]:>11} {n:>6}")
    errors = Counter(a.error for a in attempts if not a.server_id)
    for error, n in errors.most_common():
        print(f"  FAILED {n} of {len(attempts)} tries: {error}")
    return len(errors)


def _report_certificates(attempts: Sequence[Attempt], opts: LbOptions) -> int:
    """Chain, names and expiry per replica; the number of problems (warnings aside)."""
    print()
    print("Certificates")
    problems = 0
    seen: dict[str, Attempt] = {}
    for attempt in attempts:
        if attempt.server_id and attempt.cert is not None:
            seen.setdefault(attempt.server_id, attempt)
    ca = opts.ca_cert or "the system's CAs"
    for server_id, attempt in sorted(seen.items()):
        cert = attempt.cert
        assert cert is not None
        print(f"  server {server_id}")
        print(f"    chain   ok: verified against {ca}")
        listed = ", ".join(cert.names) or "no subject alternative name"
        if matches(cert.names, opts.server_name):
            print(f"    names   ok: {opts.server_name} is among {listed}")
        else:
            problems += 1
            print(
                f"    names   MISMATCH: the certificate names {listed}, not {opts.server_name}, "
                "so Go agents refuse it. Fix: add it to the SANs of the servers' "
                "--cluster-cert, or give the agents one of those names as --proxy-server-host"
            )
        print(f"    expiry  {_expiry(cert.days_left(), cert.expiry(), opts.warn_days)}")
    if opts.agent_cert:
        expires = agent_cert_expiry(opts.agent_cert)
        if expires is not None:
            left = (expires - time.time()) / SECONDS_PER_DAY
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires))
            print(f"  agent certificate {opts.agent_cert}")
            print(f"    expiry  {_expiry(left, when, opts.warn_days)}")
    if not seen:
        print("  no server answered: nothing to check")
    return problems


def _expiry(days: float, when: str, warn_days: float) -> str:
    if days < 0:
        return f"EXPIRED on {when}"
    text = f"{when}, in {days:.0f} days"
    return f"WARNING: {text} (under {warn_days:g})" if days < warn_days else f"ok: {text}"
