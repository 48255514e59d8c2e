"""The requests the demo carries through each frontend, and what they measure.

Per mode, through the real proxy-server and proxy-agents:

1. one tunnel, ``GET /healthz`` (the backend must answer ``200 ok``);
2. round trips: ``RTT_REQUESTS`` sequential ``GET /healthz`` on that tunnel;
3. throughput: ``GET /bulk`` of ``DOWNLOAD_BYTES``, every byte checked against the
   backend's pattern;
4. tunnel set-up: ``SETUP_TUNNELS`` tunnels opened one after another (a new gRPC connection
   each, as konnectivity-client does), timed from the first byte sent to the dial's answer,
   spread over the given targets.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from konnectivity_fast.cli.demo.report import Out, mb_per_s, median, ms, percentile, us
from konnectivity_fast.cli.demo.tunnels import ConnectTunnel, GrpcTunnel, HttpClient, Tunnel
from konnectivity_fast.wire.contract import FrontendMode

__all__ = ["DOWNLOAD_BYTES", "ModeResult", "exercise"]

RTT_REQUESTS = 200
SETUP_TUNNELS = 20
# Large enough to measure a rate over more than a moment, small enough to stay brief.
DOWNLOAD_BYTES = 64 << 20
_PATTERN = bytes(range(256)) * (((1 << 20) // 256) + 2)  # the backend's bytes, repeated

Opener = Callable[[str, str], Awaitable[Tunnel]]


def opener(mode: str) -> Opener:
    if mode == FrontendMode.GRPC:
        return GrpcTunnel.open
    return ConnectTunnel.open


@dataclass
class ModeResult:
    healthz: str = ""
    setups: list[float] = field(default_factory=list)
    rtts: list[float] = field(default_factory=list)
    downloaded: int = 0
    download_seconds: float = 0.0
    verified: bool = False


class _Checker:
    """Checks a download against the backend's pattern, piece by piece."""

    def __init__(self) -> None:
        self.offset = 0
        self.ok = True

    def __call__(self, piece: bytes) -> None:
        view = memoryview(piece)
        while view:
            start = self.offset % 256
            n = min(len(view), len(_PATTERN) - start)
            if view[:n] != memoryview(_PATTERN)[start : start + n]:
                self.ok = False
            self.offset += n
            view = view[n:]


async def exercise(
    out: Out, mode: str, uds: str, targets: Sequence[str], result: ModeResult
) -> None:
    """Run the steps above through the frontend on ``uds``; ``targets[0]`` gets the
    requests, all of them get set-up tunnels. Fills ``result`` as it goes."""
    open_tunnel = opener(mode)
    target = targets[0]
    tunnel = await open_tunnel(uds, target)
    try:
        http = HttpClient(tunnel, target)
        status, body = await http.request("/healthz")
        result.healthz = f"{status} {body.decode(errors='replace')}"
        out.row("GET /healthz", f"http://{target}/healthz: {result.healthz}")
        async with out.step("round trips", lambda: f"{len(result.rtts)} done") as done:
            for _ in range(RTT_REQUESTS):
                started = time.perf_counter()
                await http.request("/healthz")
                result.rtts.append(time.perf_counter() - started)
            p50, p99 = percentile(result.rtts, 0.5), percentile(result.rtts, 0.99)
            done(f"p50 {us(p50)}, p99 {us(p99)} ({RTT_REQUESTS}x GET /healthz on one tunnel)")
        await _download(out, http, result)
    finally:
        await tunnel.close()
    async with out.step("tunnel set-up", lambda: f"{len(result.setups)} open") as done:
        for i in range(SETUP_TUNNELS):
            started = time.perf_counter()
            extra = await open_tunnel(uds, targets[i % len(targets)])
            result.setups.append(time.perf_counter() - started)
            await extra.close()
        typical, worst = median(result.setups), max(result.setups)
        done(f"median {ms(typical)}, max {ms(worst)} ({SETUP_TUNNELS} tunnels, one by one)")


async def _download(out: Out, http: HttpClient, result: ModeResult) -> None:
    checker = _Checker()

    def sink(piece: bytes) -> None:
        checker(piece)
        result.downloaded += len(piece)

    mib = DOWNLOAD_BYTES >> 20
    async with out.step("throughput", lambda: f"{result.downloaded >> 20} of {mib} MiB") as done:
        started = time.perf_counter()
        status, _ = await http.request(f"/bulk?bytes={DOWNLOAD_BYTES}", sink=sink)
        result.download_seconds = time.perf_counter() - started
        result.verified = status == 200 and checker.ok and result.downloaded == DOWNLOAD_BYTES
        check = "every byte checked" if result.verified else "CONTENT DIFFERS"
        rate = mb_per_s(result.downloaded, result.download_seconds)
        done(f"{rate} (GET /bulk, {mib} MiB, {check})")
