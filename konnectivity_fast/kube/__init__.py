"""Our own small Kubernetes API client (no client library): configuration from a
kubeconfig or in-cluster, JSON over HTTP/1.1 with TLS, and the few calls the proxy-server
and proxy-agent make (TokenReview, Leases). A lower layer: it imports nothing else of the
project, and server/ and agent/ may use it.

The client and its configuration are loaded on first use (``_lazy.py``): importing
``kube.labels`` for the ``--lease-label`` flag must not bring the client into a program
that counts no leases and reviews no tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

from konnectivity_fast._lazy import lazy_exports

if TYPE_CHECKING:
    from konnectivity_fast.kube.client import (
        ApiError,
        KubeClient,
        KubeError,
        TransportError,
    )
    from konnectivity_fast.kube.config import ClientConfig, ConfigError, load_config

_EXPORTS = {
    "konnectivity_fast.kube.client": ("ApiError", "KubeClient", "KubeError", "TransportError"),
    "konnectivity_fast.kube.config": ("ClientConfig", "ConfigError", "load_config"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "ApiError",
    "ClientConfig",
    "ConfigError",
    "KubeClient",
    "KubeError",
    "TransportError",
    "load_config",
]
