"""Server peering, sans-IO: a dial no agent here can take goes to a peer proxy-server
(ours, beyond upstream; docs/high-availability.md, "Server peering").

A peer stream is a ``/ProxyService/Proxy`` stream this server opens to another server. It
carries the packets an agent stream carries, in the same directions (DIAL_REQ, DATA,
CLOSE_REQ and DIAL_CLS out; DIAL_RSP, DATA and CLOSE_RSP back), so to the router it is one
more kind of backend: a ``PeerBackend``, never stored in the ``--proxy-strategies``
managers (never chosen for a dial) and carrying exactly one dial, then that dial's one
connection. Once established, DATA and CLOSE take the router's ordinary paths, fast path
included; connectIDs are the peer's (its agent's), so nothing is rewritten on the way.

``PeeringRouter`` differs from ``Router`` only where no agent is found:

1. A frontend's DIAL_REQ (or HTTP CONNECT) finds no backend, and the frontend is not
   itself forwarded: the dial becomes pending on a new, unattached ``PeerBackend`` and the
   router emits ``ForwardDial``. The adapter offers it to the peers in turn, each on its
   own stream with its own random (``PeerBackend.sent_random``); a peer that answers
   ``No agent available``, or cannot be reached, is skipped.
2. The adapter reports the first real answer with ``peer_answered`` (success: the
   connection is established under the peer's connectID and the frontend gets its
   DIAL_RSP with its own random, or its HTTP 200; an error goes back as the agent's
   would), or that every peer failed with ``peer_unavailable`` (upstream's ``No agent
   available``, at once).
3. Whenever a ``PeerBackend`` owns no dial and no connection any more (the dial failed or
   was cancelled, the connection closed either way, the frontend left), the router
   forgets it and emits ``EndPeer``, carrying the last packets for it (the CLOSE_REQ of a
   frontend that left): the adapter sends them and half-closes the stream (or withdraws
   a dial still being offered), and the peer server cleans up its side as for any client
   that leaves.

Invariants (beyond ``Router``'s):
- A forwarded frontend's dial is never forwarded (hop limit 1: no loops, whatever the
  peers list).
- A ``PeerBackend`` holds at most one dial or one connection; it is in the router's
  backends (so the invariants of ``Router`` cover it) exactly until ``EndPeer`` or
  ``remove_backend``, and never in a backend manager.
- ``peer_answered`` and ``peer_unavailable`` on a dial that is no longer pending do
  nothing (it was cancelled meanwhile); ``peer_answered`` then returns None, so the adapter
  ends the stream it opened.
"""

from __future__ import annotations

from typing import Any

from konnectivity_fast.tunnel.events import (
    CloseReason,
    DialDuration,
    DialFailure,
    DialFailureReason,
    Effect,
    EndPeer,
    ForwardDial,
    SendToAgent,
    SendToFrontend,
    TunnelEstablished,
)
from konnectivity_fast.tunnel.records import (
    Backend,
    Frontend,
    PendingDial,
    ProxyClientConnection,
)
from konnectivity_fast.tunnel.replies import ERR_NO_AGENT, dial_rsp, reply
from konnectivity_fast.tunnel.router import Router
from konnectivity_fast.wire.contract import AgentIdentifiers, FrontendMode
from konnectivity_fast.wire.packets import DialResponse, Packet, PacketType

__all__ = ["PEER_AGENT_PREFIX", "PeerBackend", "PeeringRouter", "is_no_agent"]

#: How a peer stream shows among agents (admin listing): ``peer:<server id>``.
PEER_AGENT_PREFIX = "peer:"
# The random of a peer DIAL_REQ: 63 bits like HTTP-CONNECT's; one dial per stream, so it
# only has to be unpredictable, not unique.
_PEER_RANDOM_BITS = 63


def is_no_agent(error: str) -> bool:
    """A peer's DIAL_RSP error meaning "I have no agent for it either": try the next one."""
    return error.startswith(ERR_NO_AGENT)


class PeerBackend(Backend):
    """A peer stream as the router sees it. ``sent_random``: the random of the DIAL_REQ
    the adapter sends on it. ``peer_id``: the peer server's ID, once attached (the adapter
    sets ``conn`` through ``peer_answered``)."""

    __slots__ = ("peer_id", "sent_random")

    def __init__(self, backend_id: int, sent_random: int) -> None:
        super().__init__(backend_id, "", AgentIdentifiers())
        self.sent_random = sent_random
        self.peer_id = ""

    def __repr__(self) -> str:
        state = " closed" if self.closed else "" if self.conn is not None else " unattached"
        return f"<PeerBackend {self.id} peer={self.peer_id!r}{state}>"


class PeeringRouter(Router):
    """``Router`` plus forwarding to peer servers (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Peer backends that lost a dial or a connection since the last public call.
        self._touched: list[PeerBackend] = []

    # --- the adapter's reports ----------------------------------------------------------

    def peer_answered(
        self,
        dial: PendingDial,
        peer_id: str,
        conn: Any,
        response: DialResponse,
        now: float,
    ) -> list[Effect] | None:
        """Peer ``peer_id`` answered the forwarded ``dial`` on stream ``conn`` with
        ``response``, a DIAL_RSP that is not ``No agent available``. None: the
        dial is gone meanwhile; the adapter ends the stream (closing the connection)."""
        backend = dial.backend
        if self._pending.get(dial.random) is not dial or not isinstance(backend, PeerBackend):
            return None
        backend.peer_id = peer_id
        backend.agent_id = PEER_AGENT_PREFIX + peer_id
        backend.conn = conn
        self._remove_pending(dial)
        frontend = dial.frontend
        error, connect_id = response.error, response.connect_id
        effects: list[Effect]
        if error:
            effects = [
                DialFailure(DialFailureReason.ERROR_RESPONSE),
                self._dial_failed(dial, CloseReason.DIAL_ERROR, error),
            ]
            return self._finish(effects)
        effects = self._add_established(ProxyClientConnection(dial, connect_id), now)
        effects.append(DialDuration(now - dial.start))
        if frontend.mode is FrontendMode.GRPC:
            response = DialResponse(random=dial.random, connect_id=connect_id)
            effects.append(SendToFrontend(frontend, Packet(PacketType.DIAL_RSP, response)))
        else:
            frontend.connect_id = connect_id
            effects.append(TunnelEstablished(frontend, connect_id))
        return self._finish(effects)

    def peer_unavailable(self, dial: PendingDial) -> list[Effect]:
        """No peer took ``dial``: upstream's ``No agent available``, as if no peer were
        configured."""
        if self._pending.get(dial.random) is not dial:
            return []
        self._remove_pending(dial)
        frontend = dial.frontend
        if frontend.mode is FrontendMode.GRPC:
            frontend.stopped = True
            effects: list[Effect] = [
                DialFailure(DialFailureReason.NO_AGENT),
                reply(frontend, dial_rsp(dial.random, ERR_NO_AGENT)),
            ]
        else:  # not counted as a dial failure in this mode, as upstream
            effects = [self._close_http(frontend, CloseReason.NO_AGENT, ERR_NO_AGENT)]
        return self._finish(effects)

    # --- the router's entry points, each followed by ending idle peer streams -----------

    def receive_from_frontend(self, *args: Any, **kwargs: Any) -> list[Effect]:
        return self._finish(super().receive_from_frontend(*args, **kwargs))

    def receive_from_agent(self, *args: Any, **kwargs: Any) -> list[Effect]:
        return self._finish(super().receive_from_agent(*args, **kwargs))

    def remove_frontend(self, frontend: Frontend) -> list[Effect]:
        return self._finish(super().remove_frontend(frontend))

    def remove_backend(self, backend: Backend, now: float) -> list[Effect]:
        return self._finish(super().remove_backend(backend, now))

    def retire_backend(self, backend: Backend) -> list[Effect]:
        """Agent streams only: a peer stream carries one dial, which ``handle_timer``
        already bounds, and is ended rather than retired."""
        if isinstance(backend, PeerBackend):
            return []
        return self._finish(super().retire_backend(backend))

    def dial_http_connect(self, frontend: Frontend, address: str, now: float) -> list[Effect]:
        return self._finish(super().dial_http_connect(frontend, address, now))

    def handle_timer(self, now: float) -> list[Effect]:
        return self._finish(super().handle_timer(now))

    # --- hooks ----------------------------------------------------------------------------

    def _forwards(self, frontend: Frontend) -> bool:
        return not frontend.forwarded

    def _forward_dial(
        self, frontend: Frontend, random: int, protocol: str, address: str, now: float
    ) -> list[Effect]:
        backend = PeerBackend(next(self._ids), self._rng.getrandbits(_PEER_RANDOM_BITS))
        self._backends[backend.id] = backend
        frontend.backend = backend
        dial = PendingDial(random, frontend, backend, address, now)
        self._add_pending(dial)
        return [ForwardDial(dial, protocol or "tcp")]

    def _remove_pending(self, dial: PendingDial) -> None:
        super()._remove_pending(dial)
        if isinstance(dial.backend, PeerBackend):
            self._touched.append(dial.backend)

    def _remove_established(self, conn: ProxyClientConnection) -> None:
        super()._remove_established(conn)
        if isinstance(conn.backend, PeerBackend):
            self._touched.append(conn.backend)

    def _finish(self, effects: list[Effect]) -> list[Effect]:
        """Forget the peer backends left with nothing, and end their streams."""
        while self._touched:
            backend = self._touched.pop()
            if backend.closed or backend.dials or backend.connections:
                continue
            backend.closed = True
            backend.closing.clear()
            del self._backends[backend.id]
            # What this call sends the peer goes out with the end (nothing is addressed to
            # a closed backend); a stream never opened gets nothing.
            final = [e for e in effects if isinstance(e, SendToAgent) and e.backend is backend]
            if final:
                effects[:] = [e for e in effects if e not in final]
            opened = backend.conn is not None
            effects.append(EndPeer(backend, tuple(e.message for e in final) if opened else ()))
        return effects
