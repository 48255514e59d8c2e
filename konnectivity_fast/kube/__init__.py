"""Our own small Kubernetes API client (no client library): configuration from a
kubeconfig or in-cluster, JSON over HTTP/1.1 with TLS, and the few calls the proxy-server
and proxy-agent make (TokenReview, Leases). A lower layer: it imports nothing else of the
project, and server/ and agent/ may use it."""

from konnectivity_fast.kube.client import (
    ApiError,
    KubeClient,
    KubeError,
    TransportError,
)
from konnectivity_fast.kube.config import ClientConfig, ConfigError, load_config

__all__ = [
    "ApiError",
    "ClientConfig",
    "ConfigError",
    "KubeClient",
    "KubeError",
    "TransportError",
    "load_config",
]
