"""asyncio adapters over the compiled HTTP/2 engine, shared by server/ and agent/.

``grpc``: ``GrpcProtocol`` (one connection) and ``GrpcCall`` (one stream), plus helpers to
listen and connect. ``tls``: SSL contexts with ALPN ``h2``. ``dial`` and ``dialerr``: TCP
dials with Go's error texts (the agent's backends, the server's agent-initiated dials).
"""
