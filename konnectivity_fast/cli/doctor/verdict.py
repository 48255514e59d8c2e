"""What ``doctor lb``'s tally of ``serverid``/``servercount`` answers means (sans-IO).

An agent connects through one address again and again until it holds as many distinct
server IDs as the servers advertise in ``servercount`` (``--server-count``). So through a
good balancer, tries land on every replica; the verdicts:

- ``ok``: every advertised replica answered (round robin, or any spreading balancer);
- ``sticky``: every try landed on one replica while more are advertised (``balance
  source``, a persistence timeout, a failover-only VIP): agents hold only that one, and
  kube-apiserver's requests through the others fail with "No agent available";
- ``short``: fewer distinct replicas than advertised after all tries (a replica missing
  from the pool or failing its health checks, or ``--server-count`` set too high): agents
  never complete their set and keep reconnecting;
- ``count too low``: more replicas answered than they advertise: agents stop at the
  advertised count and the replicas they did not reach get no agent;
- ``inconsistent``: replicas advertise different counts (agents believe whichever
  answered first);
- ``unreachable``: no try got an answer.

Each comes with what to change. Errors of some tries are reported on their own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from konnectivity_fast.cli.doctor.probe import Attempt

__all__ = ["Verdict", "judge"]

OK = "ok"
STICKY = "sticky"
SHORT = "short"
COUNT_TOO_LOW = "count too low"
INCONSISTENT = "inconsistent"
UNREACHABLE = "unreachable"

FIX_STICKY = (
    "spread new connections over the replicas: HAProxy `balance roundrobin` (or leastconn) "
    "instead of `balance source`; keepalived/LVS without persistence_timeout; nginx stream "
    "without `hash $remote_addr`; an OpenShift passthrough route with the annotation "
    "haproxy.router.openshift.io/balance=roundrobin"
)
FIX_SHORT = (
    "put every replica in the balancer's pool and check its health checks see them up "
    "(HAProxy: one `server` line each, `show stat` on the stats socket); if there really "
    "are only {seen}, set --server-count={seen} on every server; agents with "
    "--sync-forever keep looking and pick a replica up once it is back"
)
FIX_COUNT_TOO_LOW = "set --server-count={seen} (the number of replicas) on every server"
FIX_INCONSISTENT = (
    "set the same --server-count (the number of replicas) on every server, or count "
    "servers by their leases: --enable-lease-controller on the servers and "
    "--count-server-leases on the agents"
)


@dataclass
class Verdict:
    kind: str
    summary: str
    fix: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.kind == OK


def judge(attempts: Sequence[Attempt]) -> Verdict:
    answered = [a for a in attempts if a.server_id]
    tries = len(attempts)
    if not answered:
        return Verdict(UNREACHABLE, f"none of the {tries} tries got an answer from a server")
    per_server = Counter(a.server_id for a in answered)
    counts = {a.server_id: a.server_count for a in answered}
    seen = len(per_server)
    if len(set(counts.values())) > 1:
        said = ", ".join(f"{sid} says {n}" for sid, n in sorted(counts.items()))
        return Verdict(
            INCONSISTENT, f"the servers advertise different counts: {said}", FIX_INCONSISTENT
        )
    count = next(iter(counts.values()))
    landed = f"{len(answered)} tries"
    if seen > count:
        return Verdict(
            COUNT_TOO_LOW,
            f"{seen} distinct servers answered, but they advertise --server-count={count}: agents "
            f"stop after {count} and the other {seen - count} get no agent",
            FIX_COUNT_TOO_LOW.format(seen=seen),
        )
    if seen == count:
        spread = "round robin and complete" if seen > 1 else "a single server, as advertised"
        return Verdict(OK, f"{spread}: {landed} reached all {count} servers they advertise")
    if seen == 1:
        only = next(iter(per_server))
        return Verdict(
            STICKY,
            f"all {landed} landed on server {only}, but the servers advertise {count}: agents "
            f"behind this address hold only {only}, and requests through the other {count - 1} "
            'fail with "No agent available"',
            FIX_STICKY,
        )
    return Verdict(
        SHORT,
        f"{landed} reached only {seen} of the {count} servers advertised: {count - seen} "
        "never answered through this address, so agents never hold every server",
        FIX_SHORT.format(seen=seen),
    )
