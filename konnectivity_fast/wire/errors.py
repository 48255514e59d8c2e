"""Errors of the wire layer and the gRPC status codes they map to.

Every malformed input to a codec raises a subclass of ``CodecError`` (a ``ValueError``);
anything else escaping a codec is a bug, and that sentence is the fuzz invariant. Both codec
twins raise the same subclass for the same input.
"""

from __future__ import annotations

from enum import IntEnum


class StatusCode(IntEnum):
    """gRPC status codes (the gRPC spec's numbering)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class CodecError(ValueError):
    """Malformed bytes. ``status`` is the gRPC status a stream fails with because of it."""

    status: StatusCode = StatusCode.INTERNAL


class TruncatedError(CodecError):
    """A varint, length or field runs past the end of its enclosing message."""


class VarintError(CodecError):
    """A varint longer than 10 bytes, or whose 10th byte is above 1 (Go rejects both)."""


class TagError(CodecError):
    """Field number 0, an end-group with no start, or a wire type that does not exist."""


class Utf8Error(CodecError):
    """A proto3 ``string`` field holding bytes that are not valid UTF-8."""


class NestingError(CodecError):
    """Groups nested deeper than ``MAX_NESTING``."""


class GrpcFramingError(CodecError):
    """A gRPC length-prefixed message that cannot be accepted."""


class MessageTooLargeError(GrpcFramingError):
    """A message above the receive limit (grpc-go's default is 4 MiB)."""

    status = StatusCode.RESOURCE_EXHAUSTED


class CompressedMessageError(GrpcFramingError):
    """The compressed flag is set, but no ``grpc-encoding`` was negotiated (we offer none)."""


class InvalidFlagError(GrpcFramingError):
    """The 5-byte prefix's flag byte is neither 0 nor 1."""
