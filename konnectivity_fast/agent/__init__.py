"""The proxy-agent's asyncio adapters (docs/architecture.md, "The layers").

``client``: ``AgentClient``, one connection and Connect stream to one proxy-server.
``endpoint``: backend sockets, dialing and the shared memory budget. ``clientset``:
``ClientSet``, the sync loop keeping one connection per server replica. ``policy``: the
pure backoff and server-count decisions (Go-shaped dial errors: ``transport.dialerr``). ``health``:
the health and admin HTTP servers. ``app``: ``run(options, stop)``, the whole process.
"""
