# cython: language_level=3
# cython: auto_pickle=False, autotestdict=False
"""The compiled core of konnectivity-fast (a Cython hub; its parts live in ``csrc/``).

- ``codec.pxi``: the Packet codec and gRPC framing, the same API as the pure twin
  ``konnectivity_fast.wire._codec``, plus the DATA fast path.
- ``h2.pxi``: ``H2Connection``, one sans-IO HTTP/2 + gRPC connection over libnghttp2, for
  the server and the client role.
- ``process.pxi``: glibc's ``mallopt`` and ``malloc_trim`` for ``cli/malloc.py``.

``SOURCE_DIGEST`` identifies the sources this build came from (see ``_build.py``).

``_wire.pyi`` is the module's exact type stub, checked against this build by
``python -m mypy.stubtest konnectivity_fast._wire``. Nothing here is pickled, so Cython's
automatic pickling (``auto_pickle``) and doctest dictionary (``autotestdict``) are off: they
would only add names the stub cannot describe.
"""

cdef extern from *:
    const char* KF_SOURCE_DIGEST

SOURCE_DIGEST = KF_SOURCE_DIGEST.decode("ascii")

include "codec.pxi"
include "framing.pxi"
include "h2.pxi"
include "process.pxi"
