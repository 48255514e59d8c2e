"""``ServiceEndpoints``: the ready endpoints of the proxy-servers' Service, as direct
endpoints for the agent (``--server-discovery=service`` with
``--proxy-server-service=<namespace>/<name>``; docs/high-availability.md).

The precedent is k3s's agent, which keeps one tunnel per address of the ``kubernetes``
Service. This keeps an informer (``agent.informer``) on the ``discovery.k8s.io/v1``
EndpointSlices labelled ``kubernetes.io/service-name=<name>``; the agent needs ``list``
and ``watch`` on ``endpointslices`` in that namespace.

``endpoints()`` reads the cache: each endpoint that is not marked unready
(``conditions.ready`` absent counts as ready, as Kubernetes documents) gives its first
address with the slice's port: the one numbered ``--proxy-server-port`` if the slice has
it, else its only port (a Service may map its port to another target port); a slice with
several ports and none of that number gives nothing, as the right one cannot be known.
Server IDs are not in a Service: they are learned on connecting.
"""

from __future__ import annotations

from typing import Any

from konnectivity_fast.agent.informer import Informer
from konnectivity_fast.kube import KubeClient
from konnectivity_fast.wire.endpoints import Address

__all__ = ["SERVICE_NAME_LABEL", "ServiceEndpoints", "slice_endpoints"]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def _slice_port(ports: object, wanted: int) -> int | None:
    if not isinstance(ports, list):
        return None
    numbers = [p["port"] for p in ports if isinstance(p, dict) and isinstance(p.get("port"), int)]
    if wanted in numbers:
        return wanted
    return numbers[0] if len(numbers) == 1 else None


def slice_endpoints(endpoint_slice: dict[str, Any], wanted_port: int) -> list[Address]:
    """The ready addresses of one EndpointSlice (module docstring); never raises."""
    port = _slice_port(endpoint_slice.get("ports"), wanted_port)
    if port is None or not 0 < port < 65536:
        return []
    found: list[Address] = []
    for endpoint in endpoint_slice.get("endpoints") or []:
        if not isinstance(endpoint, dict):
            continue
        conditions = endpoint.get("conditions") or {}
        addresses = endpoint.get("addresses") or []
        if conditions.get("ready") is False or not addresses or not isinstance(addresses[0], str):
            continue
        found.append(Address(addresses[0], port))
    return found


class ServiceEndpoints(Informer):
    """The ready endpoints of Service ``namespace/name`` (module docstring)."""

    what = "endpointslices"

    def __init__(
        self,
        namespace: str,
        name: str,
        port: int,
        *,
        kubeconfig: str = "",
        client: KubeClient | None = None,
    ) -> None:
        super().__init__(
            f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
            f"{SERVICE_NAME_LABEL}={name}",
            kubeconfig=kubeconfig,
            client=client,
        )
        self.port = port

    def endpoints(self) -> dict[Address, str]:
        """Address -> "" (no server ID is known from a Service)."""
        return {
            address: ""
            for endpoint_slice in self.objects.values()
            for address in slice_endpoints(endpoint_slice, self.port)
        }
