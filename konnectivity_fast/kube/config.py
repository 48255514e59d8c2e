"""Where the Kubernetes API is and how to talk to it: a kubeconfig file or in-cluster.

``load_config(kubeconfig, qps, burst)`` mirrors what upstream gets from client-go's
``BuildConfigFromFlags(kubeconfig)``: an empty path means the in-cluster config.

From a kubeconfig, the current context's cluster (``server``, ``certificate-authority``
or ``-data``, ``insecure-skip-tls-verify``, ``tls-server-name``) and user
(``client-certificate``/``client-key`` or their ``-data``, ``token``, ``tokenFile``,
``username``/``password``) are used; relative file paths are relative to the kubeconfig's
folder, as in client-go. ``exec`` and ``auth-provider`` plugins are refused with a clear
error rather than ignored (a silent anonymous client would fail far from the cause).

In-cluster: ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT`` and the service
account folder (``token``, ``ca.crt``); the folder is a parameter so tests can use their
own. The token file is read again when older than ``TOKEN_FILE_REFRESH`` (projected tokens
rotate), as client-go does.

Every file is read here, once, so a bad path fails at startup with its name.

Values are typed as client-go types them: the YAML is resolved as go-yaml v2 does
(``kube.yamlsubset``: ``insecure-skip-tls-verify: yes`` is true) and a value of the wrong
JSON type for its Go field (``"true"`` quoted, or ``1``, for that boolean) refuses the file
with encoding/json's words, as client-go's loader does.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from konnectivity_fast.kube.yamlsubset import YamlError, loads

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_QPS",
    "IN_CLUSTER_ROOT",
    "TOKEN_FILE_REFRESH",
    "ClientConfig",
    "ConfigError",
    "load_config",
    "load_in_cluster",
    "load_kubeconfig",
]

# client-go's rest.DefaultQPS and rest.DefaultBurst, used when the flags are 0.
DEFAULT_QPS = 5.0
DEFAULT_BURST = 10
IN_CLUSTER_ROOT = "/var/run/secrets/kubernetes.io/serviceaccount"
# client-go re-reads a token file once a minute: bound tokens are rotated by the kubelet.
TOKEN_FILE_REFRESH = 60.0


class ConfigError(Exception):
    """The configuration cannot be loaded; the message names the cause."""


@dataclass(frozen=True)
class ClientConfig:
    """Everything a ``KubeClient`` needs; files are already read."""

    server: str  # scheme://host[:port][/prefix], no trailing slash
    ca_pem: bytes | None = None
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = None
    token: str | None = None
    token_file: str | None = None
    basic_auth: tuple[str, str] | None = None
    insecure_skip_tls_verify: bool = False
    tls_server_name: str | None = None
    qps: float = DEFAULT_QPS
    burst: int = DEFAULT_BURST
    # The in-cluster namespace (from the service account folder), when known.
    namespace: str | None = field(default=None, compare=False)

    @property
    def host(self) -> str:
        return urlsplit(self.server).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.server)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def use_tls(self) -> bool:
        return urlsplit(self.server).scheme == "https"

    @property
    def path_prefix(self) -> str:
        return urlsplit(self.server).path.rstrip("/")


def load_config(kubeconfig: str, qps: float = 0.0, burst: int = 0) -> ClientConfig:
    """``--kubeconfig``, ``--kubeconfig-qps`` and ``--kubeconfig-burst``: the file when a
    path is given, else the in-cluster config. QPS and burst of 0 keep client-go's
    defaults; a negative QPS turns rate limiting off, as in client-go."""
    config = load_kubeconfig(kubeconfig) if kubeconfig else load_in_cluster()
    return _with_limits(config, qps, burst)


def _with_limits(config: ClientConfig, qps: float, burst: int) -> ClientConfig:
    return ClientConfig(
        **{
            **config.__dict__,
            "qps": qps if qps != 0 else DEFAULT_QPS,
            "burst": burst if burst != 0 else DEFAULT_BURST,
        }
    )


def load_in_cluster(
    root: str = IN_CLUSTER_ROOT, environ: Mapping[str, str] | None = None
) -> ClientConfig:
    """The pod's service account config (client-go's ``rest.InClusterConfig``)."""
    env = os.environ if environ is None else environ
    host = env.get("KUBERNETES_SERVICE_HOST", "")
    port = env.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise ConfigError(
            "unable to load in-cluster configuration, KUBERNETES_SERVICE_HOST and "
            "KUBERNETES_SERVICE_PORT must be defined"
        )
    if ":" in host:  # an IPv6 address needs brackets in a URL
        host = f"[{host}]"
    token_file = os.path.join(root, "token")
    _read(token_file, "in-cluster token")  # fail now, not on the first request
    namespace = None
    ns_path = Path(root, "namespace")
    if ns_path.is_file():
        namespace = ns_path.read_text().strip() or None
    return ClientConfig(
        server=f"https://{host}:{port}",
        ca_pem=_read(os.path.join(root, "ca.crt"), "in-cluster CA"),
        token_file=token_file,
        namespace=namespace,
    )


def load_kubeconfig(path: str, context: str | None = None) -> ClientConfig:
    """The cluster and user of ``context`` (default: ``current-context``) in ``path``."""
    raw = _read(path, "kubeconfig").decode("utf-8", "replace")
    try:
        doc = loads(raw)
    except YamlError as exc:
        raise ConfigError(f"error loading config file {path!r}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"invalid configuration: {path!r} is not a kubeconfig mapping")
    base = os.path.dirname(os.path.abspath(path))
    name = context or doc.get("current-context") or ""
    if not name:
        raise ConfigError(f"invalid configuration: no current-context in {path!r}")
    ctx = _named(doc, "contexts", "context", name, path)
    cluster = _named(doc, "clusters", "cluster", str(ctx.get("cluster") or ""), path)
    user_name = str(ctx.get("user") or "")
    user = _named(doc, "users", "user", user_name, path) if user_name else {}
    server = str(cluster.get("server") or "").rstrip("/")
    if not server:
        raise ConfigError(f"invalid configuration: no server found for cluster {name!r}")
    if urlsplit(server).scheme not in ("http", "https"):
        raise ConfigError(f"invalid configuration: unsupported server URL {server!r}")
    for plugin in ("exec", "auth-provider"):
        if user.get(plugin):
            raise ConfigError(f"kubeconfig user {user_name!r}: {plugin} plugins are not supported")
    token = user.get("token") or None
    token_file = user.get("tokenFile") or None
    if token_file:
        token_file = os.path.join(base, str(token_file))
        _read(token_file, "tokenFile")
    basic = None
    if user.get("username"):
        basic = (str(user["username"]), str(user.get("password") or ""))
    return ClientConfig(
        server=server,
        ca_pem=_pem(cluster, "certificate-authority", base),
        client_cert_pem=_pem(user, "client-certificate", base),
        client_key_pem=_pem(user, "client-key", base),
        token=str(token) if token else None,
        token_file=token_file,
        basic_auth=basic,
        insecure_skip_tls_verify=_flag(cluster, "insecure-skip-tls-verify", path),
        tls_server_name=str(cluster.get("tls-server-name") or "") or None,
        namespace=str(ctx.get("namespace")) if ctx.get("namespace") else None,
    )


def _json_type(value: Any) -> str:
    """The JSON type encoding/json names in its errors."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _flag(cluster: dict[str, Any], name: str, path: str) -> bool:
    """A boolean field of a cluster: what client-go's JSON decoding of it gives."""
    value = cluster.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(
            f"error loading config file {json.dumps(path)}: json: cannot unmarshal "
            f"{_json_type(value)} into Go struct field Cluster.clusters.cluster.{name} of type bool"
        )
    return value


def _named(doc: dict[str, Any], section: str, key: str, name: str, path: str) -> dict[str, Any]:
    """Entry ``name`` of a kubeconfig list such as ``clusters``: its inner mapping."""
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            inner = entry.get(key) or {}
            if not isinstance(inner, dict):
                raise ConfigError(f"invalid configuration: {section} entry {name!r} in {path!r}")
            return inner
    raise ConfigError(f"invalid configuration: {key} {name!r} not found in {path!r}")


def _pem(section: dict[str, Any], name: str, base: str) -> bytes | None:
    """``<name>-data`` (base64) or the file ``<name>``, relative to the kubeconfig."""
    data = section.get(f"{name}-data")
    if data:
        try:
            return base64.b64decode(str(data), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"invalid configuration: {name}-data is not base64") from None
    path = section.get(name)
    if path:
        return _read(os.path.join(base, str(path)), name)
    return None


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"unable to read {what} {path!r}: {exc.strerror or exc}") from None
