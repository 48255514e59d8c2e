"""``proxy-agent``: upstream's command line in front of ``agent.app.run``.

As upstream's cobra command and main do, every error (a flag error, a validation error as
``failed to validate agent options with <err>``, a start-up failure as
``failed to run proxy connection with <err>``) prints ``Error: <err>`` and the usage to
stderr, logs ``error: <err>`` and exits 1; ``-h``/``--help`` prints the help and exits 0.
The first SIGTERM or SIGINT starts the drain (DRAIN to every server, no new connections);
the second stops the agent, which exits 0 (upstream's cmd/agent/app/server.go
``handleSignals``).

With ``--count-server-leases`` the Lease counter (``agent.leases``) is made here; the
Kubernetes client is imported only then, off the default path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import signal
import sys
from collections.abc import Sequence

from konnectivity_fast.agent.app import (
    EndpointWatcher,
    LeaseCounter,
    SetupError,
    discovery_names,
    run,
)
from konnectivity_fast.agent.portmap import parse_mappings
from konnectivity_fast.agent.reverse import NodeToCpConfig
from konnectivity_fast.cli.agent_options import (
    PROGRAM,
    GrpcProxyAgentOptions,
    build_flagset,
    parse_args,
    usage,
)
from konnectivity_fast.cli.command import Program, run_program
from konnectivity_fast.cli.extensions import node_to_cp_active, offered_extensions
from konnectivity_fast.wire.contract import Extension, ExtensionSet

__all__ = ["main"]

log = logging.getLogger("konnectivity_fast.agent")


async def _serve(options: GrpcProxyAgentOptions, extensions: ExtensionSet | None = None) -> int:
    loop = asyncio.get_running_loop()
    drain, stop = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        if drain.is_set():
            log.info("received signal %d again, stopping", signum)
            stop.set()
            return
        log.info("received signal %d, draining", signum)
        drain.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await run(
            options,
            stop,
            drain,
            lease_counter=_lease_counter(options),
            service_watcher=_service_watcher(options),
            extensions=_offered(options) if extensions is None else extensions,
            node_to_cp=_node_to_cp(options),
        )
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def _lease_counter(options: GrpcProxyAgentOptions) -> LeaseCounter | None:
    if not options.count_server_leases:
        return None
    from konnectivity_fast.agent.leases import LeaseCounter as Leases

    return Leases(options.lease_namespace, options.lease_label, kubeconfig=options.kubeconfig_path)


def _service_watcher(options: GrpcProxyAgentOptions) -> EndpointWatcher | None:
    if "service" not in discovery_names(options.server_discovery):
        return None
    from konnectivity_fast.agent.service import ServiceEndpoints

    namespace, name = options.proxy_server_service.split("/")
    return ServiceEndpoints(
        namespace, name, options.proxy_server_port, kubeconfig=options.kubeconfig_path
    )


def _node_to_cp(options: GrpcProxyAgentOptions) -> NodeToCpConfig | None:
    """The node-to-control-plane listeners, when the feature is active."""
    if not node_to_cp_active(options.apiserver_port_mappings, options.feature_gates):
        return None
    return NodeToCpConfig(
        mappings=parse_mappings(options.apiserver_port_mappings),
        bind_address=options.bind_address,
        dial_timeout=options.apiserver_port_mapping_dial_timeout,
    )


def _offered(options: GrpcProxyAgentOptions) -> ExtensionSet:
    """What the agent offers each server: the shared extension flags, and the servers'
    endpoint lists when it discovers servers from them."""
    offered = offered_extensions(options)
    if "headers" in discovery_names(options.server_discovery):
        offered = offered | {Extension.SERVER_ENDPOINTS}
    if node_to_cp_active(options.apiserver_port_mappings, options.feature_gates):
        offered = offered | {Extension.NODE_TO_CP}
    return offered


PROXY_AGENT = Program(
    name=PROGRAM,
    parse=parse_args,
    flagset=build_flagset,
    usage=usage,
    what="agent",
    serve=_serve,
    startup_errors=(SetupError,),
    startup_prefix="failed to run proxy connection with ",
)


def main(argv: Sequence[str] | None = None, *, extensions: ExtensionSet | None = None) -> int:
    """The ``proxy-agent`` program; returns the exit code. ``extensions``: what the agent
    offers each server (``wire.contract``); None: what its flags enable
    (``cli/extensions.py``). A program embedding the agent (or a test) may pass its own
    set, a test token included."""
    program = dataclasses.replace(
        PROXY_AGENT, serve=functools.partial(_serve, extensions=extensions)
    )
    return run_program(program, argv)


if __name__ == "__main__":
    sys.exit(main())
