"""The Kubernetes manifests in deploy/kubernetes/: every argument our images get is accepted
by our option parsers and passes their validation (with the files it names present), the
probes point at the health ports the arguments set, the egress selector configurations
agree with the servers they describe, the agents' tokens carry the audience the servers
check, and every object is accepted by a real kube-apiserver (server-side dry run with
strict field validation, in a namespace of the test's own)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from konnectivity_fast.cli import agent_options, server_options
from tests.support import kubeapi
from tests.support.kubeapi import KubeCluster, admin_client

kube_cluster = kubeapi.kube_cluster
pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
SERVER_IMAGE = "konnectivity-fast/proxy-server:"
AGENT_IMAGE = "konnectivity-fast/proxy-agent:"
# Values the kubelet would give the fieldRef variables the arguments use.
FIELD_VALUES = {"status.hostIP": "192.0.2.10", "metadata.name": "konnectivity-server-7d9f"}
# Upstream's health ports: the probes must use them.
SERVER_HEALTH_PORT = 8092
AGENT_HEALTH_PORT = 8093
# Flags naming something other than a file that must exist.
NOT_FILES = {"--uds-name", "--log-file"}
# Where each kind lives in the API: (path prefix, plural, namespaced).
RESOURCES = {
    "Pod": ("/api/v1", "pods", True),
    "Service": ("/api/v1", "services", True),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "DaemonSet": ("/apis/apps/v1", "daemonsets", True),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
}
EGRESS_KIND = "EgressSelectorConfiguration"
# kube-apiserver's egress selection names (master is the old name of controlplane).
EGRESS_NAMES = {"cluster", "controlplane", "master", "etcd"}

Doc = dict[str, Any]


def documents() -> list[tuple[str, Doc]]:
    docs = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((str(path.relative_to(MANIFESTS)), doc))
    return docs


def pod_spec(doc: Doc) -> Doc | None:
    if doc["kind"] == "Pod":
        return dict(doc["spec"])
    if doc["kind"] in ("Deployment", "DaemonSet"):
        return dict(doc["spec"]["template"]["spec"])
    return None


def containers(image: str) -> Iterator[tuple[str, Doc, Doc]]:
    """(file, pod spec, container) for every container running ``image``."""
    for name, doc in documents():
        spec = pod_spec(doc)
        for container in (spec or {}).get("containers", []):
            if image in container["image"]:
                yield name, spec or {}, container


def expand(arg: str, container: Doc) -> str:
    """The kubelet's $(VAR) expansion, with the container's env (fieldRefs: sample values)."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = FIELD_VALUES[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)


def args_of(container: Doc) -> list[str]:
    return [expand(str(arg), container) for arg in container.get("args", [])]


def with_files_under(args: list[str], root: Path) -> list[str]:
    """The arguments with every absolute path moved under ``root``, where the files exist."""
    moved = []
    for arg in args:
        flag, eq, value = arg.partition("=")
        if eq and value.startswith("/"):
            target = root / value.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if flag not in NOT_FILES:
                target.write_text("")
            moved.append(f"{flag}={target}")
        else:
            moved.append(arg)
    return moved


def server_containers() -> list[tuple[str, Doc, Doc]]:
    found = list(containers(SERVER_IMAGE))
    assert {name.split("/")[0] for name, _, _ in found} == {"sidecar", "standalone"}
    return found


def agent_containers() -> list[tuple[str, Doc, Doc]]:
    found = list(containers(AGENT_IMAGE))
    assert len(found) == 1
    return found


def test_every_document_is_an_object_we_know() -> None:
    docs = documents()
    assert docs
    for name, doc in docs:
        assert doc["kind"] in RESOURCES or doc["kind"] == EGRESS_KIND, name
        if doc["kind"] != EGRESS_KIND:
            assert doc["metadata"]["name"], name


def test_server_arguments_parse_and_validate(tmp_path: Path) -> None:
    for name, _, container in server_containers():
        # The image's entrypoint, or upstream's explicit command for it.
        assert container.get("command", ["/proxy-server"]) == ["/proxy-server"], name
        args = with_files_under(args_of(container), tmp_path / name)
        command = server_options.parse_args(args, environ={})
        assert not command.help_requested
        assert command.options.validate() is None, (name, command.options.validate())


def test_agent_arguments_parse_and_validate(tmp_path: Path) -> None:
    for name, _, container in agent_containers():
        assert "command" not in container, "the image's entrypoint is the agent"
        args = with_files_under(args_of(container), tmp_path / name)
        command = agent_options.parse_args(args, environ={})
        assert not command.help_requested
        assert command.options.validate() is None, (name, command.options.validate())
        assert command.options.agent_identifiers == f"host={FIELD_VALUES['status.hostIP']}"


def test_probes_use_the_health_ports() -> None:
    for name, _, container in server_containers():
        options = server_options.parse_args(args_of(container), environ={}).options
        assert options.health_port == SERVER_HEALTH_PORT
        probe = container["livenessProbe"]["httpGet"]
        assert (probe["port"], probe["path"]) == (SERVER_HEALTH_PORT, "/healthz"), name
    for name, _, container in agent_containers():
        options = agent_options.parse_args(args_of(container), environ={}).options
        assert options.health_server_port == AGENT_HEALTH_PORT
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            got = container[probe]["httpGet"]
            assert (got["port"], got["path"]) == (AGENT_HEALTH_PORT, path), name


def egress(folder: str) -> Doc:
    (doc,) = [d for n, d in documents() if n.startswith(folder) and d["kind"] == EGRESS_KIND]
    names = [s["name"] for s in doc["egressSelections"]]
    assert set(names) <= EGRESS_NAMES and len(names) == len(set(names))
    for selection in doc["egressSelections"]:
        connection = selection["connection"]
        protocol = connection["proxyProtocol"]
        assert protocol in ("GRPC", "HTTPConnect", "Direct")
        if protocol == "GRPC":  # kube-apiserver: "UDS must be set with GRPC"
            assert "uds" in connection["transport"]
        if protocol == "Direct":
            assert "transport" not in connection
    return {s["name"]: s["connection"] for s in doc["egressSelections"]}


def test_sidecar_egress_selector_matches_its_server() -> None:
    cluster = egress("sidecar")["cluster"]
    assert cluster["proxyProtocol"] == "GRPC"
    ((_, spec, container),) = [c for c in server_containers() if c[0].startswith("sidecar")]
    options = server_options.parse_args(args_of(container), environ={}).options
    assert options.mode == "grpc"
    assert cluster["transport"]["uds"]["udsName"] == options.uds_name
    # kube-apiserver and the sidecar share the socket's folder.
    folder = str(Path(options.uds_name).parent)
    apiserver = next(c for c in spec["containers"] if c["name"] == "kube-apiserver")
    mounts = {m["mountPath"]: m["name"] for m in apiserver["volumeMounts"]}
    assert mounts[folder] == {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[folder]
    assert any(
        a == "--egress-selector-config-file=/etc/kubernetes/egress-selector-configuration.yaml"
        for a in apiserver["command"]
    )


def test_standalone_egress_selector_matches_its_server() -> None:
    cluster = egress("standalone")["cluster"]
    assert cluster["proxyProtocol"] == "HTTPConnect"
    tcp = cluster["transport"]["tcp"]
    url = urlsplit(tcp["url"])
    assert url.scheme == "https"
    assert set(tcp["tlsConfig"]) == {"caBundle", "clientCert", "clientKey"}
    ((_, _, container),) = [c for c in server_containers() if c[0].startswith("standalone")]
    options = server_options.parse_args(args_of(container), environ={}).options
    assert options.mode == "http-connect"
    assert url.port == options.server_port
    assert options.server_ca_cert  # mutual TLS: client certificates are required
    service = next(d for _, d in documents() if d["kind"] == "Service")
    assert (
        url.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}"
        ".svc.cluster.local"
    )
    assert {p["port"] for p in service["spec"]["ports"]} == {
        options.server_port,
        options.agent_port,
    }


def test_agent_token_fits_the_servers() -> None:
    ((_, spec, container),) = agent_containers()
    options = agent_options.parse_args(args_of(container), environ={}).options
    (volume,) = [v for v in spec["volumes"] if "projected" in v]
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert options.service_account_token_path == f"{mount['mountPath']}/{token['path']}"
    for _, _, server in server_containers():
        server_opts = server_options.parse_args(args_of(server), environ={}).options
        assert token["audience"] == server_opts.authentication_audience
        assert spec["serviceAccountName"] == server_opts.agent_service_account
        assert server_opts.agent_namespace == "kube-system"
    # The agent counts servers from Leases: its Role must allow reading them.
    role = next(d for n, d in documents() if n.startswith("agent") and d["kind"] == "Role")
    (rule,) = role["rules"]
    assert rule["resources"] == ["leases"] and {"get", "list", "watch"} <= set(rule["verbs"])


def test_kube_apiserver_accepts_every_object(kube_cluster: KubeCluster) -> None:
    namespace = f"kf-manifests-{uuid.uuid4().hex[:8]}"

    def localized(doc: Doc) -> Doc:
        # kube-system's objects, moved to the test's namespace (a shared test cluster).
        text = yaml.safe_dump(doc).replace("namespace: kube-system", f"namespace: {namespace}")
        return dict(yaml.safe_load(text))

    async def check() -> list[str]:
        admin = admin_client(kube_cluster)
        problems = []
        try:
            await admin.request(
                "POST",
                "/api/v1/namespaces",
                body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
            )
            # Pods need their service accounts to exist (no controller-manager makes them).
            await admin.create_service_account(namespace, "default")
            docs = [(n, localized(d)) for n, d in documents() if d["kind"] != EGRESS_KIND]
            for _, doc in docs:
                if doc["kind"] == "ServiceAccount":
                    await admin.request(
                        "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", body=doc
                    )
            for name, doc in docs:
                if doc["kind"] == "ServiceAccount":
                    continue  # created above
                prefix, plural, namespaced = RESOURCES[doc["kind"]]
                path = (
                    f"{prefix}/namespaces/{namespace}/{plural}"
                    if namespaced
                    else f"{prefix}/{plural}"
                )
                query = {"dryRun": "All", "fieldValidation": "Strict"}
                try:
                    await admin.request("POST", path, body=doc, query=query)
                except Exception as exc:  # the API's message is the finding
                    problems.append(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc}")
            await admin.request("DELETE", f"/api/v1/namespaces/{namespace}")
        finally:
            await admin.close()
        return problems

    assert asyncio.run(check()) == []
