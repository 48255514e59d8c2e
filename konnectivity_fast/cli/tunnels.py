"""``konnectivity-fast tunnels``: a program's open tunnels, as a table a person reads at a
glance (as ``kubectl top`` shows pods).

It reads the tunnel listing from a proxy-server's or proxy-agent's admin port
(``--admin=HOST:PORT``, plain HTTP; ``wire.contract.ADMIN_TUNNELS_PATH``, the document is
described in ``tunnel/listing.py``), tells the two programs apart by the document's
``program``, and prints:

- a header line: the program and its ID, open tunnels and pending dials, the peers they
  run through, bytes each way over every open tunnel, the order and how many rows of how
  many are shown;
- the tunnels per peer (agents on the server, servers on the agent), busiest first, at
  most ``MAX_PEERS_SHOWN`` of them;
- one row per tunnel with aligned columns: sizes in KiB/MiB/GiB, ages like ``3m12s``,
  STATE ``paused`` (its source is not read), ``holding`` (it holds its shared stream) or
  ``-``, WINDOW the flow-control credit window or ``-``.

``--watch`` redraws every ``WATCH_INTERVAL`` seconds until Ctrl-C (or ``--count``
refreshes); a failed fetch is shown and retried at the next tick instead of ending the
watch. Each fetch is bounded in time (``FETCH_TIMEOUT``) and size (``MAX_RESPONSE_BYTES``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from konnectivity_fast.tunnel.listing import DEFAULT_LIMIT
from konnectivity_fast.wire.contract import ADMIN_TUNNELS_PATH, TunnelQueryParam, TunnelSort

__all__ = [
    "FETCH_TIMEOUT",
    "MAX_PEERS_SHOWN",
    "WATCH_INTERVAL",
    "add_parser",
    "fetch",
    "human_age",
    "human_bytes",
    "main",
    "render",
]

#: Seconds between two refreshes of ``--watch``, as ``watch``'s default.
WATCH_INTERVAL = 2.0
#: Seconds one fetch may take: a listing answers in milliseconds, an admin port that does
#: not answer within this is reported rather than waited for.
FETCH_TIMEOUT = 5.0
#: The most a listing may weigh: a full one (``MAX_LIMIT`` rows and peers) is ~0.5 MB.
MAX_RESPONSE_BYTES = 4 << 20
#: Peers named in the header line; the rest are counted.
MAX_PEERS_SHOWN = 8
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen
_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


class FetchError(Exception):
    """The listing could not be had; the text says why."""


# --- units ----------------------------------------------------------------------------------


def human_bytes(count: int) -> str:
    """``512B``, ``1.5KiB``, ``15KiB``, ``340MiB``: three significant figures at most."""
    if count < 1024:
        return f"{count}B"
    value = float(count)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    """``45s``, ``3m12s``, ``2h5m``, ``3d4h``, as ``kubectl`` shows ages."""
    total = max(0, int(seconds))
    minutes, secs = divmod(total, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


# --- the document -----------------------------------------------------------------------------


def _peer_kind(document: dict[str, Any]) -> str:
    """``agent`` on a proxy-server's listing, ``server`` on a proxy-agent's."""
    return "server" if document.get("program") == "proxy-agent" else "agent"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _header(document: dict[str, Any]) -> list[str]:
    peer = _peer_kind(document)
    own = "agent" if peer == "server" else "server"
    totals = document["totals"]
    via = "via" if peer == "server" else "on"
    first = (
        f"{document['program']} {document.get(own + '_id', '?')}: "
        f"{_plural(totals['tunnels'], 'tunnel')} {via} {_plural(totals[peer + 's'], peer)}, "
        f"{_plural(totals['pending_dials'], 'pending dial')}; "
        f"up {human_bytes(totals['bytes_up'])}, down {human_bytes(totals['bytes_down'])}; "
        f"by {document['sort']}, {totals['listed']} of {totals['matched']} shown"
    )
    if document.get(peer):
        first += f" ({peer} {document[peer]})"
    if document.get("workers"):  # a proxy-server with --workers: every worker's tunnels
        first += f"; {_plural(len(document['workers']), 'worker')}"
    if document.get("dial_balance", "random") != "random":
        first += f"; dials: {document['dial_balance']}"
    peers = document.get(peer + "s", [])
    shown = []
    for entry in peers[:MAX_PEERS_SHOWN]:
        flags = [word for word in ("draining", "paused") if entry.get(word)]
        note = f" ({', '.join(flags)})" if flags else ""
        shown.append(f"{entry[peer + '_id'] or '(empty)'} {entry['tunnels']}{note}")
    line = f"{peer}s: " + (", ".join(shown) if shown else "none")
    # A filtered listing holds just the chosen peer; otherwise the totals count them all.
    hidden = (len(peers) if document.get(peer) else totals[peer + "s"]) - len(shown)
    if hidden > 0:
        line += f", +{hidden} more"
    return [first, line]


def _state(row: dict[str, Any]) -> str:
    words = [word for word in ("paused", "holding") if row.get(word)]
    return ",".join(words) or "-"


def _table(document: dict[str, Any]) -> list[str]:
    peer = _peer_kind(document)
    by_worker = bool(document.get("workers"))
    columns = ["CONN", "WORKER"] if by_worker else ["CONN"]
    columns += [peer.upper(), "DESTINATION"]
    if peer == "agent":
        columns.append("FRONTEND")
    columns += ["UP", "DOWN", "BUFFERED", "STATE", "WINDOW", "AGE"]
    rows = [columns]
    for row in document["tunnels"]:
        cells = [str(row["connection_id"])]
        if by_worker:
            cells.append(row.get("server_id") or "-")
        cells += [row[peer + "_id"] or "(empty)", row["destination"]]
        if peer == "agent":
            cells.append(row.get("frontend") or "-")
        window = row.get("window")
        cells += [
            human_bytes(row["bytes_up"]),
            human_bytes(row["bytes_down"]),
            human_bytes(row["buffered"]),
            _state(row),
            "-" if window is None else human_bytes(window),
            human_age(row["age_seconds"]),
        ]
        rows.append(cells)
    widths = [max(len(cells[i]) for cells in rows) for i in range(len(columns))]
    return [
        "   ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        for cells in rows
    ]


def render(document: dict[str, Any]) -> str:
    """The listing as text: the header lines, then the table (or a line saying there is
    no tunnel)."""
    lines = _header(document)
    lines.append("")
    if document["tunnels"]:
        lines += _table(document)
    else:
        lines.append("no open tunnels")
    return "\n".join(lines) + "\n"


# --- fetching ---------------------------------------------------------------------------------


def listing_url(admin: str, sort: str, limit: int, agent: str, server: str) -> str:
    """The listing's URL on ``admin`` (``HOST:PORT``, ``[v6]:PORT``, or a URL)."""
    base = admin if "://" in admin else f"http://{admin}"
    params = [(TunnelQueryParam.SORT, sort), (TunnelQueryParam.LIMIT, str(limit))]
    if agent:
        params.append((TunnelQueryParam.AGENT, agent))
    if server:
        params.append((TunnelQueryParam.SERVER, server))
    return f"{base.rstrip('/')}{ADMIN_TUNNELS_PATH}?{urllib.parse.urlencode(params)}"


def fetch(url: str, timeout: float = FETCH_TIMEOUT) -> dict[str, Any]:
    """The listing at ``url``; raises ``FetchError``."""
    if not url.startswith(("http://", "https://")):
        raise FetchError(f"{url}: not an http:// address")
    # No proxy: an admin port is reached directly, whatever $http_proxy says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            body = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        detail = exc.read(1024).decode("utf-8", "replace").strip()
        if exc.code == 404:
            detail = "no tunnel listing here: is it a konnectivity-fast admin port?"
        raise FetchError(f"{url}: {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise FetchError(f"{url}: {reason}") from None
    if len(body) > MAX_RESPONSE_BYTES:
        raise FetchError(f"{url}: answer larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise FetchError(f"{url}: not a tunnel listing ({exc})") from None
    if not isinstance(document, dict) or "tunnels" not in document or "totals" not in document:
        raise FetchError(f"{url}: not a tunnel listing")
    return document


# --- the command --------------------------------------------------------------------------------


def _limit(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def add_parser(sub: Any) -> None:
    """Register ``tunnels`` on ``konnectivity-fast``'s subcommands."""
    parser = sub.add_parser(
        "tunnels",
        help="open tunnels of a proxy-server or proxy-agent, from its admin port",
        description="Show the open tunnels of a konnectivity-fast proxy-server or proxy-agent, "
        "read from its admin port (--admin-port / --admin-server-port).",
    )
    parser.add_argument("--admin", required=True, metavar="HOST:PORT", help="the admin port")
    parser.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
    parser.add_argument(
        "--count", type=_limit, default=0, metavar="N", help="with --watch: stop after N"
    )
    parser.add_argument("--sort", choices=[s.value for s in TunnelSort], default="bytes")
    parser.add_argument(
        "--limit",
        type=_limit,
        default=DEFAULT_LIMIT,
        metavar="N",
        help="rows (the program caps it)",
    )
    parser.add_argument("--agent", default="", help="only this agent's tunnels (proxy-server)")
    parser.add_argument("--server", default="", help="only this server's tunnels (proxy-agent)")


def main(
    args: argparse.Namespace,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run ``tunnels``; the exit code. ``out`` and ``sleep`` are for tests."""
    out = out or sys.stdout
    url = listing_url(args.admin, args.sort, args.limit, args.agent, args.server)
    if not args.watch:
        try:
            out.write(render(fetch(url)))
        except FetchError as exc:
            print(f"konnectivity-fast tunnels: {exc}", file=sys.stderr)
            return 1
        return 0
    return _watch(url, args.count, out, sleep)


def _watch(url: str, count: int, out: TextIO, sleep: Callable[[float], None]) -> int:
    clear = _CLEAR if out.isatty() else ""
    done = 0
    try:
        while True:
            try:
                text = render(fetch(url))
            except FetchError as exc:
                text = f"{exc}\n"
            stamp = time.strftime("%H:%M:%S")
            out.write(f"{clear}every {WATCH_INTERVAL:g}s, {stamp}\n{text}")
            out.flush()
            done += 1
            if count and done >= count:
                return 0
            sleep(WATCH_INTERVAL)
    except KeyboardInterrupt:
        out.write("\n")
        return 0


def run(argv: Sequence[str]) -> int:
    """``konnectivity-fast tunnels ...`` on its own (for tests)."""
    parser = argparse.ArgumentParser(prog="konnectivity-fast")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return main(parser.parse_args(["tunnels", *argv]))
