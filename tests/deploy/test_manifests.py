"""The Kubernetes manifests in deploy/kubernetes/: every argument our images get is accepted
by our option parsers and passes their validation (with the files it names present), the
probes point at the health ports the arguments set, the egress selector configurations
agree with the servers they describe, the agents' tokens carry the audience the servers
check, and every object is accepted by a real kube-apiserver (server-side dry run with
strict field validation, in a namespace of the test's own). ha/ holds one alternative per
high-availability topology (docs/high-availability.md): each is checked against what its
topology needs (direct endpoint sources, the agents' Roles, peering and advertised
addresses)."""

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

from konnectivity_fast.agent.portmap import parse_mappings
from konnectivity_fast.cli import agent_options, server_options
from konnectivity_fast.cli.extensions import node_to_cp_active
from tests.support import kubeapi
from tests.support.kubeapi import KubeCluster, admin_client

kube_cluster = kubeapi.kube_cluster
pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
SERVER_IMAGE = "konnectivity-fast/proxy-server:"
AGENT_IMAGE = "konnectivity-fast/proxy-agent:"
# Values the kubelet would give the fieldRef variables the arguments use.
FIELD_VALUES = {
    "status.hostIP": "192.0.2.10",
    "status.podIP": "192.0.2.20",
    "metadata.name": "konnectivity-server-7d9f",
}
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
    "StatefulSet": ("/apis/apps/v1", "statefulsets", True),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
}
EGRESS_KIND = "EgressSelectorConfiguration"
# The files running each image: one container in each (ha/: one per topology, alternatives
# to agent/ and standalone/; docs/high-availability.md).
SERVER_FILES = {
    "sidecar/kube-apiserver.yaml",
    "standalone/konnectivity-server.yaml",
    "ha/hosted-control-plane.yaml",
}
AGENT_FILES = {
    "agent/konnectivity-agent.yaml",
    "ha/static-list.yaml",
    "ha/service-discovery.yaml",
    "ha/hosted-control-plane.yaml",
    "node-to-control-plane/service-endpoints.yaml",
    "node-to-control-plane/node-local-address.yaml",
}
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
    if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
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
    assert sorted(name for name, _, _ in found) == sorted(SERVER_FILES)
    return found


def agent_containers() -> list[tuple[str, Doc, Doc]]:
    found = list(containers(AGENT_IMAGE))
    assert sorted(name for name, _, _ in found) == sorted(AGENT_FILES)
    return found


def server_in(name: str) -> tuple[Doc, server_options.ProxyRunOptions]:
    """The server container of file ``name`` and its options."""
    ((_, _, container),) = [c for c in server_containers() if c[0] == name]
    return container, server_options.parse_args(args_of(container), environ={}).options


def agent_in(name: str) -> tuple[Doc, Doc, agent_options.GrpcProxyAgentOptions]:
    """The pod spec and agent container of file ``name``, and the agent's options."""
    ((_, spec, container),) = [c for c in agent_containers() if c[0] == name]
    return spec, container, agent_options.parse_args(args_of(container), environ={}).options


def docs_in(name: str, kind: str) -> list[Doc]:
    return [d for n, d in documents() if n == name and d["kind"] == kind]


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
    (service,) = docs_in("standalone/konnectivity-server.yaml", "Service")
    assert (
        url.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}"
        ".svc.cluster.local"
    )
    assert {p["port"] for p in service["spec"]["ports"]} == {
        options.server_port,
        options.agent_port,
    }


def token_auth(options: server_options.ProxyRunOptions) -> bool:
    return bool(options.authentication_audience)


def test_agent_token_fits_the_servers() -> None:
    token_servers = [
        server_options.parse_args(args_of(c), environ={}).options for _, _, c in server_containers()
    ]
    token_servers = [o for o in token_servers if token_auth(o)]
    assert len(token_servers) == 2  # sidecar and standalone; hosted agents use certificates
    token_agents = 0
    for name, spec, container in agent_containers():
        options = agent_options.parse_args(args_of(container), environ={}).options
        if not options.service_account_token_path:
            continue
        token_agents += 1
        (volume,) = [v for v in spec["volumes"] if "projected" in v]
        (source,) = volume["projected"]["sources"]
        token = source["serviceAccountToken"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert options.service_account_token_path == f"{mount['mountPath']}/{token['path']}"
        for server_opts in token_servers:
            assert token["audience"] == server_opts.authentication_audience, name
            assert spec["serviceAccountName"] == server_opts.agent_service_account, name
            assert server_opts.agent_namespace == "kube-system"
    assert token_agents == len(AGENT_FILES) - 1


def rules_of(name: str, spec: Doc) -> list[Doc]:
    """The rules of the Roles bound to the pod's service account in file ``name``."""
    account = spec.get("serviceAccountName", "default")
    bound = {
        b["roleRef"]["name"]
        for b in docs_in(name, "RoleBinding")
        if b["roleRef"]["kind"] == "Role"
        and {"kind": "ServiceAccount", "name": account, "namespace": "kube-system"} in b["subjects"]
    }
    return [
        r
        for role in docs_in(name, "Role")
        if role["metadata"]["name"] in bound
        for r in role["rules"]
    ]


def allowed(rules: list[Doc], group: str, resource: str) -> set[str]:
    return {
        verb
        for rule in rules
        if group in rule["apiGroups"] and resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_agent_roles_allow_what_the_agents_read() -> None:
    for name, spec, container in agent_containers():
        options = agent_options.parse_args(args_of(container), environ={}).options
        rules = rules_of(name, spec)
        want = []
        if options.count_server_leases:
            want.append(("coordination.k8s.io", "leases", {"get", "list", "watch"}))
        if "service" in options.server_discovery:
            want.append(("discovery.k8s.io", "endpointslices", {"list", "watch"}))
        for group, resource, verbs in want:
            assert verbs <= allowed(rules, group, resource), (name, resource)
        # Nothing beyond what the agent reads.
        assert len(rules) == len(want), name
    # The base agent counts Leases (the standalone servers run the lease controller).
    assert agent_in("agent/konnectivity-agent.yaml")[2].count_server_leases


def test_node_to_control_plane_agent() -> None:
    """Pattern 2 of docs/node-to-control-plane.md: on the host network, listening on the
    node's address, never reaching the API server through itself."""
    spec, container, options = agent_in("node-to-control-plane/service-endpoints.yaml")
    assert node_to_cp_active(options.apiserver_port_mappings, options.feature_gates)
    (mapping,) = parse_mappings(options.apiserver_port_mappings)
    assert options.bind_address == FIELD_VALUES["status.hostIP"]
    assert spec["hostNetwork"] is True
    assert {"name": "apiserver", "containerPort": mapping.local_port} in container["ports"]
    # Lease counting would read the API through the `kubernetes` Service: itself.
    assert not options.count_server_leases and not options.kubeconfig_path
    assert options.proxy_server_host and not options.proxy_server_host.endswith(".svc")


def test_node_to_control_plane_node_local_address() -> None:
    """Pattern 1: the init container puts one address on a host-scoped dummy interface,
    the agent listens there and the servers dial their own kube-apiserver."""
    spec, container, options = agent_in("node-to-control-plane/node-local-address.yaml")
    assert node_to_cp_active(options.apiserver_port_mappings, options.feature_gates)
    (mapping,) = parse_mappings(options.apiserver_port_mappings)
    assert (mapping.host, mapping.port) == ("127.0.0.1", mapping.local_port)
    assert spec["hostNetwork"] is True
    (init,) = spec["initContainers"]
    script = " ".join(init["command"])
    assert f"ip addr replace {options.bind_address}/32 dev kf0 scope host" in script
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert {"name": "apiserver", "containerPort": mapping.local_port} in container["ports"]
    assert not options.count_server_leases and not options.kubeconfig_path


def test_static_list_agent() -> None:
    _, _, options = agent_in("ha/static-list.yaml")
    assert options.proxy_server_host and options.proxy_server_tls_name
    listed = options.proxy_server_list.split(",")
    assert len(listed) >= 2 and all(a.endswith(f":{options.proxy_server_port}") for a in listed)
    # Nothing is asked of the servers beyond upstream's: the list works with theirs.
    assert not options.server_discovery and not options.count_server_leases


def test_service_discovery_agent_follows_the_standalone_servers() -> None:
    _, _, options = agent_in("ha/service-discovery.yaml")
    _, server = server_in("standalone/konnectivity-server.yaml")
    assert options.server_discovery == "service"
    (service,) = docs_in("standalone/konnectivity-server.yaml", "Service")
    meta = service["metadata"]
    assert options.proxy_server_service == f"{meta['namespace']}/{meta['name']}"
    # The EndpointSlices carry target ports: the agent takes the one numbered
    # --proxy-server-port, which must be where the servers listen for agents.
    assert any(
        p["targetPort"] == options.proxy_server_port == server.agent_port
        for p in service["spec"]["ports"]
    )
    assert options.count_server_leases and server.enable_lease_controller


def test_hosted_control_plane_servers_peer_and_advertise() -> None:
    name = "ha/hosted-control-plane.yaml"
    container, server = server_in(name)
    (statefulset,) = docs_in(name, "StatefulSet")
    replicas = statefulset["spec"]["replicas"]
    assert replicas == 3
    assert server.enable_lease_controller and server.server_id == FIELD_VALUES["metadata.name"]
    assert server.enable_peer_forwarding and server.peer_port
    # Bound to the pod's own address, so the peer endpoint is published on the Lease.
    assert server.peer_bind_address == FIELD_VALUES["status.podIP"]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in (
        container["env"]
    )
    assert server.peer_port in {p["containerPort"] for p in container["ports"]}
    assert server.cluster_ca_cert and not token_auth(server)
    # Each replica advertises its own name, on the agents' port.
    agent_spec, agent_container, agent = agent_in(name)
    host, _, port = server.agent_advertise_address.rpartition(":")
    assert host == f"{FIELD_VALUES['metadata.name']}.{agent.proxy_server_host}"
    assert int(port) == agent.proxy_server_port
    assert agent.server_discovery == "headers"
    assert agent.agent_cert and agent.agent_key and agent.ca_cert
    assert not agent.service_account_token_path and not agent.count_server_leases
    # Its certificates come from a mounted Secret.
    secrets = {v["name"] for v in agent_spec["volumes"] if "secret" in v}
    mounted = {m["mountPath"] for m in agent_container["volumeMounts"] if m["name"] in secrets}
    for path in (agent.agent_cert, agent.agent_key, agent.ca_cert):
        assert str(Path(path).parent) in mounted, path
    # One Service per replica, to the agent port.
    pod_names = {f"{statefulset['metadata']['name']}-{i}" for i in range(replicas)}
    per_replica = [
        d
        for d in docs_in(name, "Service")
        if "statefulset.kubernetes.io/pod-name" in d["spec"]["selector"]
    ]
    assert {d["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] for d in per_replica} == (
        pod_names
    )
    for service in per_replica:
        (p,) = service["spec"]["ports"]
        assert (p["port"], p["targetPort"]) == (agent.proxy_server_port, server.agent_port)


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
            # ha/ redeclares agent/'s and standalone/'s accounts: create each once.
            accounts = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "ServiceAccount"}
            for doc in accounts.values():
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
