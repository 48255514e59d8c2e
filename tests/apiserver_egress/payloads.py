"""What the fake kubelet serves and how its webhook decides, shared by the fake kubelet
(a program run in the worker network namespace) and the tests that check its answers."""

from __future__ import annotations

import random

# A body large enough to span many tunnel DATA packets and flow-control windows.
BIG_SIZE = 8 * 1024 * 1024
BIG_SEED = 8132
HELLO = b"hello from the worker's kubelet\n"
# A ConfigMap whose data has this key and value is refused by the webhook.
VERDICT_KEY = "verdict"
DENY = "deny"
DENY_MESSAGE = "the worker's webhook says no"
# Lines of the logs-style stream: the first, then (once released) the rest.
STREAM_LINES = 5


def big_body(size: int = BIG_SIZE, seed: int = BIG_SEED) -> bytes:
    return random.Random(seed).randbytes(size)


def stream_line(i: int) -> bytes:
    return f"log line {i}\n".encode()
