"""Label values shared by the server's and the agent's stream metrics (upstream's
konnectivity-client ``common/metrics``): segments, packet type names, gRPC code names, and the
two families both programs register under their own prefix."""

from __future__ import annotations

from konnectivity_fast.metrics.registry import CounterChild, CounterVec, Registry

# The prefix of every metric family of an extension beyond upstream (``wire.contract``).
# Such a family is registered only when its extension is enabled, so that the default
# exposition stays upstream's (tests/data/metrics/).
EXTENSION_PREFIX = "konnectivity_fast_"

# Segments of a tunnel, as label values.
SEGMENT_FROM_CLIENT = "from_client"
SEGMENT_TO_CLIENT = "to_client"
SEGMENT_FROM_AGENT = "from_agent"
SEGMENT_TO_AGENT = "to_agent"

# packet_type of a receive error, where no packet was read.
PACKET_TYPE_UNKNOWN = "Unknown"

# PacketType enum names by number; another number shows as its decimal string.
_PACKET_TYPE_NAMES = ("DIAL_REQ", "DIAL_RSP", "CLOSE_REQ", "CLOSE_RSP", "DATA", "DIAL_CLS", "DRAIN")

# gRPC status code names by number (Go's codes.Code.String()).
_GRPC_CODE_NAMES = (
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
)


def packet_type_name(packet_type: int) -> str:
    """The label value of a packet type: its enum name, or its number for an unknown one."""
    if 0 <= packet_type < len(_PACKET_TYPE_NAMES):
        return _PACKET_TYPE_NAMES[packet_type]
    return str(int(packet_type))


def grpc_code_name(code: int) -> str:
    """The label value of a gRPC status code: ``Unavailable``, ``Canceled``, ``Code(99)``..."""
    if 0 <= code < len(_GRPC_CODE_NAMES):
        return _GRPC_CODE_NAMES[code]
    return f"Code({int(code)})"


def stream_packets(prefix: str, registry: Registry) -> CounterVec:
    return CounterVec(
        prefix + "stream_packets_total",
        "Count of packets processed, by segment and packet type (example: from_client, DIAL_REQ)",
        ("segment", "packet_type"),
        registry=registry,
    )


def stream_errors(prefix: str, registry: Registry) -> CounterVec:
    return CounterVec(
        prefix + "stream_errors_total",
        "Count of gRPC stream errors, by segment, grpc Code, packet type. "
        "(example: from_agent, Code.Unavailable, DIAL_RSP)",
        ("segment", "code", "packet_type"),
        registry=registry,
    )


class PacketCounters:
    """stream_packets_total children by (segment, packet type number), created on first
    count so a series appears with its first packet, as upstream's do."""

    __slots__ = ("_children", "_vec")

    def __init__(self, vec: CounterVec) -> None:
        self._vec = vec
        self._children: dict[tuple[str, int], CounterChild] = {}

    def child(self, segment: str, packet_type: int) -> CounterChild:
        try:
            return self._children[segment, packet_type]
        except KeyError:
            child = self._vec.labels(segment, packet_type_name(packet_type))
            self._children[segment, packet_type] = child
            return child

    def inc(self, segment: str, packet_type: int) -> None:
        try:
            self._children[segment, packet_type].inc()
        except KeyError:
            self.child(segment, packet_type).inc()

    def clear(self) -> None:
        self._children.clear()
