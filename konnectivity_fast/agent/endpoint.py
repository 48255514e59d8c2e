"""The agent's side of one tunneled connection: the backend TCP socket (``Endpoint``), the
dial that opens it (``dial``, from ``transport.dial``) and the memory budget all endpoints
share (``EndpointPool``).

Backend -> server, an endpoint reads into the pool's one shared buffer (``READ_SIZE``, or
``CONGESTED_READ_SIZE`` while its stream is congested) and offers each read to its owner
as one DATA packet. Server -> backend, it writes what arrives for it once per loop turn and
counts what its backend has not taken yet against ``ENDPOINT_WRITE_BUDGET``, and the pool
against ``AGENT_WRITE_BUDGET``; a spent budget pauses the server stream. Why, and what that
bounds: docs/data-path.md ("Agent, backend to server" and "Agent, server to backend").

Invariants:
- An endpoint reads nothing from its socket until the owner says the DIAL_RSP went out
  (``start_reading``): a connection's first DATA always follows its DIAL_RSP.
- One read is one DATA packet, never split, never merged.
- Every endpoint reports ``connection_lost`` to its owner exactly once.
- The counting is event-driven: transports are given write limits of 0/0, so asyncio calls
  ``pause_writing`` whenever bytes stay queued and ``resume_writing`` once they are all
  written. Between those events an endpoint's count is the queue size at its last write, an
  upper bound; the process total is recounted exactly before it is declared exhausted.
  With flow.v1 the budgets are not used and the low mark is where the next grant is due
  (``_grant``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, cast

from konnectivity_fast.metrics import flow as flow_metrics
from konnectivity_fast.transport.buffers import zeroed_buffer
from konnectivity_fast.transport.dial import DIAL_TIMEOUT, close_after_flush, dial
from konnectivity_fast.transport.loop import RunningLoop, resume_writing_at
from konnectivity_fast.tunnel.flow import GrowthBudget, ReceiveWindow, SendCredit

__all__ = [
    "AGENT_WRITE_BUDGET",
    "CONGESTED_READ_SIZE",
    "DIAL_TIMEOUT",
    "ENDPOINT_WRITE_BUDGET",
    "READ_SIZE",
    "Endpoint",
    "EndpointOwner",
    "EndpointPool",
    "dial",
]

log = logging.getLogger(__name__)

#: Largest backend read, i.e. largest DATA payload the agent sends. Upstream reads 4 KiB;
#: bigger reads mean far fewer packets per byte, and 128 KiB stays well inside the 4 MiB
#: gRPC message limit of every receiver and the 10-packet read queue of the Go client.
READ_SIZE = 128 << 10
#: Largest backend read while the endpoint's server stream is congested (endpoints take
#: turns on it, ``sender``): a turn then costs the other tunnels at most this.
CONGESTED_READ_SIZE = 16 << 10
#: Server->backend bytes one backend may leave unread before its server stream is paused:
#: a few HTTP/2 stream windows, so a backend that is briefly slow (a GC pause, a full
#: socket buffer) never holds up the other tunnels of its stream.
ENDPOINT_WRITE_BUDGET = 4 << 20
#: Server->backend bytes all backends of the process may leave unread before every server
#: stream is paused: bounds the agent's memory when many backends are slow at once
#: (deployments run the agent under 30-128 MiB limits).
AGENT_WRITE_BUDGET = 32 << 20
# Streams resume once the queued total is back under this (hysteresis).
AGENT_WRITE_RESUME = AGENT_WRITE_BUDGET // 2
# A backend closed by CLOSE_REQ gets transport.dial.CLOSE_FLUSH_TIMEOUT to take what is
# queued for it (upstream closes at once and may drop it; we flush, boundedly).


class EndpointOwner(Protocol):
    """The server stream an endpoint belongs to (``client.AgentClient``)."""

    @property
    def congested(self) -> bool:
        """Endpoints wait for their turn on the stream: read in small pieces."""
        ...

    def endpoint_data(self, endpoint: Endpoint, data: bytes) -> bool:
        """Send ``data`` as one DATA packet; False when it waits for the endpoint's turn
        (the owner keeps it, and calls ``endpoint.resume_reading`` once it is sent)."""
        ...

    def endpoint_lost(self, endpoint: Endpoint, exc: Exception | None) -> None: ...

    def endpoint_credit(self, endpoint: Endpoint, nbytes: int) -> None:
        """flow.v1: grant the server ``nbytes`` more for this endpoint (FLOW_CREDIT)."""
        ...

    def update_inbound(self) -> None:
        """Re-decide whether the server stream must be paused (``EndpointPool.holds``)."""
        ...


class EndpointPool:
    """The endpoints of one agent process: shared read buffer and write budget."""

    def __init__(
        self, endpoint_budget: int = ENDPOINT_WRITE_BUDGET, agent_budget: int = AGENT_WRITE_BUDGET
    ) -> None:
        self.endpoint_budget = endpoint_budget
        self.agent_budget = agent_budget
        self.agent_resume = agent_budget // 2
        #: flow.v1: the window growth of every endpoint of the process (tunnel/flow.py).
        self.growth = GrowthBudget()
        self.view = zeroed_buffer(READ_SIZE)
        self.small_view = self.view[:CONGESTED_READ_SIZE]
        self.total = 0  # upper bound of queued server->backend bytes
        self._backlogged: set[Endpoint] = set()
        self.exhausted = False
        self.owners: set[EndpointOwner] = set()
        # Endpoints with DATA held for one write (``Endpoint.write``), flushed once the
        # packets of the current read from the server are all dispatched.
        self._dirty: list[Endpoint] = []
        self.running_loop = RunningLoop()

    def schedule_flush(self, endpoint: Endpoint) -> None:
        if not self._dirty:
            self.running_loop().call_soon(self._flush)
        self._dirty.append(endpoint)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for endpoint in dirty:
            endpoint.flush()

    def account(self, endpoint: Endpoint, size: int) -> None:
        """``endpoint`` has ``size`` bytes queued now."""
        self.total += size - endpoint.counted
        endpoint.counted = size
        if size:
            self._backlogged.add(endpoint)
        else:
            self._backlogged.discard(endpoint)
        over = size > self.endpoint_budget
        if over != endpoint.over_budget:
            endpoint.over_budget = over
            endpoint.owner.update_inbound()
        if not self.exhausted and self.total > self.agent_budget:
            self._recount()
            if self.total > self.agent_budget:
                log.warning(
                    "backends hold %d queued bytes (budget %d): pausing every server stream",
                    self.total,
                    self.agent_budget,
                )
                self._set_exhausted(True)
        elif self.exhausted and size == 0:
            self._recount()
            if self.total <= self.agent_resume:
                self._set_exhausted(False)

    def _recount(self) -> None:
        total = 0
        for endpoint in list(self._backlogged):
            size = endpoint.queued()
            endpoint.counted = size
            total += size
            if not size:
                self._backlogged.discard(endpoint)
        self.total = total

    def _set_exhausted(self, value: bool) -> None:
        self.exhausted = value
        for owner in list(self.owners):
            owner.update_inbound()


class Endpoint(asyncio.BufferedProtocol):
    """One backend socket of one tunneled connection, dialled to ``address`` at ``started``
    (loop time). ``bytes_up`` (server -> backend) and ``bytes_down`` (backend -> server)
    count its payload bytes for the admin listing, one integer add per read or write."""

    __slots__ = (
        "_credit_paused",
        "_early",
        "_established",
        "_lost",
        "_pending",
        "_pending_size",
        "_read_paused",
        "_reading",
        "address",
        "bytes_down",
        "bytes_up",
        "closing",
        "connect_id",
        "counted",
        "credit",
        "over_budget",
        "owner",
        "pool",
        "started",
        "transport",
        "window",
    )

    def __init__(
        self,
        pool: EndpointPool,
        owner: EndpointOwner,
        connect_id: int,
        address: str = "",
        started: float = 0.0,
    ) -> None:
        self.pool = pool
        self.owner = owner
        self.connect_id = connect_id
        self.address = address
        self.started = started
        self.bytes_up = 0
        self.bytes_down = 0
        self.transport: asyncio.Transport | None = None
        self.counted = 0
        self.over_budget = False
        self.closing = False  # CLOSE_REQ or stream loss: no more DATA either way
        self._established = False
        self._lost = False
        self._read_paused = False  # waiting for its turn on the stream (FairSender)
        self._credit_paused = False  # flow.v1: its send credit is spent
        self._reading = False  # the transport is reading
        #: flow.v1, once negotiated (``enable_flow``): credit toward the server, and the
        #: window the server may fill toward the backend.
        self.credit: SendCredit | None = None
        self.window: ReceiveWindow | None = None
        self._early: list[bytes] = []  # read before the DIAL_RSP went out (uvloop)
        # Server->backend payloads not yet handed to the transport (``write``).
        self._pending: list[bytes | memoryview] | None = None
        self._pending_size = 0

    # -- asyncio.BufferedProtocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        t.pause_reading()  # nothing may be read before the DIAL_RSP is sent
        t.set_write_buffer_limits(0, 0)  # see the module docstring: event-driven counting

    def get_buffer(self, sizehint: int) -> memoryview:
        pool = self.pool
        view = pool.small_view if self.owner.congested else pool.view
        credit = self.credit
        if credit is not None and 0 < credit.credit < len(view):
            return view[: credit.credit]  # flow.v1: never read more than may be sent
        return view

    def buffer_updated(self, nbytes: int) -> None:
        if self.closing:
            return
        # One read, one DATA packet. The engine keeps a reference, so copy out of the
        # shared buffer (both views start at its beginning).
        data = bytes(self.pool.view[:nbytes])
        self.bytes_down += nbytes
        if not self._established:
            # uvloop starts reading after connection_made even when it paused reading
            # there: hold this read until the DIAL_RSP is out, and pause again.
            self._early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        if not self.owner.endpoint_data(self, data):
            self.pause_reading()
        credit = self.credit
        if credit is not None and not credit.spend(nbytes):
            flow_metrics.stalled()
            self._credit_paused = True
            self._update_reading()

    def eof_received(self) -> bool:
        return False  # no half-close in Konnectivity: the whole connection ends

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._pending, self._pending_size = None, 0
        self.pool.account(self, 0)
        if self.window is not None:
            self.window.release()
        self.owner.endpoint_lost(self, exc)

    def pause_writing(self) -> None:
        pass  # counted at each write (``write``)

    def resume_writing(self) -> None:
        if self.window is not None:
            self._grant()  # flow.v1: the backend took everything
        else:
            self.pool.account(self, 0)

    # -- used by the owner --

    @property
    def reading_paused(self) -> bool:
        """The admin listing's "paused": the backend is not read (waiting for its turn on
        the server stream, or the stream's window)."""
        return self._read_paused

    def queued(self) -> int:
        t = self.transport
        if t is None or self._lost:
            return 0
        return t.get_write_buffer_size() + self._pending_size

    def enable_flow(self) -> None:
        """flow.v1 was negotiated on this endpoint's stream: credit both ways from now (the
        connection is established by the DIAL_RSP about to go out)."""
        self.credit = SendCredit()
        self.window = ReceiveWindow(self.pool.growth)

    def start_reading(self) -> None:
        """The DIAL_RSP is on its way: start reading the backend."""
        self._established = True
        early, self._early = self._early, []
        credit = self.credit
        for data in early:
            if not self.closing and not self.owner.endpoint_data(self, data):
                self._read_paused = True
            if credit is not None and not credit.spend(len(data)):
                self._credit_paused = True
        self._update_reading()

    def pause_reading(self) -> None:
        """Wait for a turn on the stream (the owner calls ``resume_reading``)."""
        self._read_paused = True
        self._update_reading()

    def resume_reading(self) -> None:
        self._read_paused = False
        self._update_reading()

    def add_credit(self, nbytes: int) -> None:
        """flow.v1: the server granted ``nbytes`` more."""
        credit = self.credit
        if credit is None:
            return
        flow_metrics.received(nbytes)
        if credit.add(nbytes):
            self._credit_paused = False
            self._update_reading()

    def _update_reading(self) -> None:
        """Read from the backend unless a reason holds (turn, credit, not established)."""
        t = self.transport
        if t is None or self._lost:
            return
        want = (
            self._established
            and not self.closing
            and not self._read_paused
            and not self._credit_paused
        )
        if want and not self._reading:
            self._reading = True
            t.resume_reading()
        elif not want and self._reading:
            self._reading = False
            t.pause_reading()

    def write(self, data: bytes | memoryview) -> None:
        """Server->backend bytes; queued without limit here, counted against the budget.
        Held until the packets of the current read from the server are dispatched, then
        written with the others for this backend in one call (``flush``): a client that
        sends in 16 KiB pieces costs one syscall per read instead of one per packet."""
        t = self.transport
        if t is None or self.closing or self._lost or t.is_closing():
            return
        if self._pending is None:
            self._pending = [data]
            self.pool.schedule_flush(self)
        else:
            self._pending.append(data)
        self._pending_size += len(data)
        self.bytes_up += len(data)
        window = self.window
        if window is None:
            self.pool.account(self, t.get_write_buffer_size() + self._pending_size)
        elif not window.receive(len(data)):
            # flow.v1: bounded by the window instead of the budgets; a server far past
            # its credit is broken, and only this connection pays for it.
            log.warning(
                "server sent %d bytes past its credit on connection %d: closing it",
                -window.in_flight,
                self.connect_id,
            )
            self.abort()

    def flush(self) -> None:
        """Hand the held payloads to the transport (one ``writev`` on uvloop)."""
        pending, self._pending = self._pending, None
        self._pending_size = 0
        t = self.transport
        if not pending or t is None or self._lost or t.is_closing():
            return
        if len(pending) == 1:
            t.write(pending[0])
        else:
            t.writelines(pending)
        if self.window is not None:
            self._grant()
        else:
            self.pool.account(self, t.get_write_buffer_size())

    def _grant(self) -> None:
        """flow.v1: give the server back what the backend took (at most once per loop
        turn: after ``flush``, and when the backend's queue is down to where a grant's
        worth is free, ``resume_writing``)."""
        window = self.window
        if window is None or self.closing or self._lost:
            return
        queued = self.queued()
        nbytes = window.grant(queued, self.pool.running_loop().time())
        if nbytes:
            flow_metrics.granted(nbytes)
            self.owner.endpoint_credit(self, nbytes)
        t = self.transport
        level = window.drain_target() if queued else None
        if level is not None and t is not None:
            # resume_writing (and so the next grant) once the backend's queue is down to
            # where a grant's worth is free, not only once it is empty: the server then
            # has credit before the backend runs dry.
            resume_writing_at(t, level)

    def close(self) -> None:
        """CLOSE_REQ: stop reading, give the backend a bounded time for what is queued,
        then close."""
        self.flush()  # what came before the CLOSE_REQ still goes out
        self.closing = True
        close_after_flush(self.transport)

    def abort(self) -> None:
        """The server stream is gone: drop the backend connection at once."""
        self.closing = True
        self._pending, self._pending_size = None, 0
        if self.transport is not None:
            self.transport.abort()
