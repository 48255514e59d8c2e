# cython: language_level=3
"""The compiled core of konnectivity-fast (a Cython hub; its parts live in ``csrc/``).

- ``codec.pxi``: the Packet codec and gRPC framing, the same API as the pure twin
  ``konnectivity_fast.wire._codec``, plus the DATA fast path.
- ``h2.pxi``: ``H2Connection``, one sans-IO HTTP/2 + gRPC connection over libnghttp2, for
  the server and the client role.

``SOURCE_DIGEST`` identifies the sources this build came from (see ``_build.py``).
"""

cdef extern from *:
    const char* KF_SOURCE_DIGEST

SOURCE_DIGEST = KF_SOURCE_DIGEST.decode("ascii")

include "codec.pxi"
include "framing.pxi"
include "h2.pxi"
