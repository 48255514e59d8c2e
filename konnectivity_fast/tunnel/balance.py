"""Dial balancing: which of a strategy's candidate agent streams gets a dial
(``wire.contract.DialBalance``; upstream issue #15, open since 2019).

Upstream picks at random (``default``, ``defaultRoute``) or the first match
(``destHost``), so a new or restarted agent gets no more of the new dials than an agent
already carrying thousands of tunnels. With ``least-tunnels`` each strategy still decides
*which* streams are candidates, exactly as upstream's (``tunnel.backends``); only the choice
among them changes: a non-draining candidate with the fewest open tunnels, ties broken
uniformly at random, and a draining one only when every candidate drains (upstream's
fallback).

A stream's *open tunnels* (``open_tunnels``) are its pending dials plus its established
connections: counting the dials sent but not yet answered is what spreads a burst of
concurrent dials, instead of sending all of it to whichever agent was least loaded when it
began. Both are the router's own maps (``Backend.dials``, ``Backend.connections``), so the
count is exact by construction: it changes in the same step that opens or closes a tunnel,
and a lost stream takes its count with it. Connections whose frontend left and whose
agent has not confirmed the close yet (``Backend.closing``) no longer count.

Cost: one pass over the candidates per dial, no allocation when one candidate is least
loaded (about 0.2 µs per candidate on the reference machine; 5,000 agents cost ~1 ms per
dial, far below a dial's own cost across the agent's network).

Invariants: nothing here keeps state; the only random draw is the caller's
``random.Random``, one per dial with tied candidates, none otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from random import Random

from konnectivity_fast.tunnel.records import Backend

__all__ = ["DRAINING_PENALTY", "least_loaded", "open_tunnels"]

#: Added to a draining stream's load so that any non-draining candidate ranks first: more
#: than any real number of tunnels (a stream holds far fewer than 2**40 connections).
DRAINING_PENALTY = 1 << 40


def open_tunnels(backend: Backend) -> int:
    """The tunnels ``backend`` carries now: pending dials plus established connections."""
    return len(backend.dials) + len(backend.connections)


def least_loaded(candidates: Iterable[Backend], rng: Random) -> Backend | None:
    """A non-draining candidate with the fewest open tunnels (uniformly among equals), else
    the least loaded draining one; None when there is no candidate."""
    best: Backend | None = None
    best_load = 0
    ties: list[Backend] | None = None
    for backend in candidates:
        load = len(backend.dials) + len(backend.connections)
        if backend.draining:
            load += DRAINING_PENALTY
        if best is None or load < best_load:
            best, best_load, ties = backend, load, None
        elif load == best_load:
            if ties is None:
                ties = [best]
            ties.append(backend)
    if ties is not None:
        return ties[rng.randrange(len(ties))]
    return best
