"""Kubeconfig and in-cluster loading, and the YAML subset kubeconfigs are read with."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from konnectivity_fast.kube.client import KubeClient, RateLimiter
from konnectivity_fast.kube.config import (
    DEFAULT_BURST,
    DEFAULT_QPS,
    ClientConfig,
    ConfigError,
    load_config,
    load_in_cluster,
    load_kubeconfig,
)
from konnectivity_fast.kube.yamlsubset import YamlError, loads

# The layout kubectl (go-yaml) writes: sequences at their key's indent, sorted keys.
KUBECTL_STYLE = """\
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {ca}
    server: https://10.0.0.1:6443/prefix/
  name: prod
- cluster:
    insecure-skip-tls-verify: true
    server: http://127.0.0.1:8080
    tls-server-name: api.example
  name: other
contexts:
- context:
    cluster: prod
    namespace: kube-system
    user: "admin #1"
  name: prod-admin  # a comment
- context:
    cluster: other
    user: tok
  name: other-tok
current-context: prod-admin
kind: Config
preferences: {{}}
users:
- name: "admin #1"
  user:
    client-certificate: certs/admin.pem
    client-key: certs/admin.key
- name: tok
  user:
    token: 'it''s-a-token'
"""


def write_kubeconfig(tmp_path: Path) -> Path:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "admin.pem").write_bytes(b"CERT")
    (tmp_path / "certs" / "admin.key").write_bytes(b"KEY")
    path = tmp_path / "config"
    path.write_text(KUBECTL_STYLE.format(ca=base64.b64encode(b"CA-PEM").decode()))
    return path


def test_kubectl_style_kubeconfig(tmp_path: Path) -> None:
    config = load_kubeconfig(str(write_kubeconfig(tmp_path)))
    assert config.server == "https://10.0.0.1:6443/prefix"
    assert (config.host, config.port, config.path_prefix) == ("10.0.0.1", 6443, "/prefix")
    assert config.ca_pem == b"CA-PEM"
    # Relative paths are relative to the kubeconfig's folder.
    assert (config.client_cert_pem, config.client_key_pem) == (b"CERT", b"KEY")
    assert config.token is None
    assert config.namespace == "kube-system"
    assert not config.insecure_skip_tls_verify


def test_other_context(tmp_path: Path) -> None:
    config = load_kubeconfig(str(write_kubeconfig(tmp_path)), context="other-tok")
    assert config.token == "it's-a-token"
    assert config.insecure_skip_tls_verify
    assert config.tls_server_name == "api.example"
    assert (config.use_tls, config.port) == (False, 8080)


def test_json_kubeconfig_and_limits(tmp_path: Path) -> None:
    doc = {
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [{"name": "k", "cluster": {"server": "https://h"}}],
        "users": [{"name": "u", "user": {"tokenFile": "tok"}}],
    }
    (tmp_path / "tok").write_text("secret\n")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    config = load_config(str(path))
    assert config.token_file == str(tmp_path / "tok")
    assert (config.port, config.qps, config.burst) == (443, DEFAULT_QPS, DEFAULT_BURST)
    limited = load_config(str(path), qps=50.5, burst=7)
    assert (limited.qps, limited.burst) == (50.5, 7)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("current-context: c\n", "context 'c' not found"),
        ("kind: Config\n", "no current-context"),
        (
            "current-context: c\ncontexts:\n- name: c\n  context: {cluster: k}\n",
            "unsupported YAML construct",
        ),
        (
            "current-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\n"
            "    user: u\nclusters:\n- name: k\n  cluster:\n    server: https://h\n"
            "users:\n- name: u\n  user:\n    exec:\n      command: aws\n",
            "exec plugins are not supported",
        ),
        (
            "current-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\n"
            "clusters:\n- name: k\n  cluster:\n    server: https://h\n"
            "    certificate-authority-data: '@@@'\n",
            "certificate-authority-data is not base64",
        ),
        (
            "current-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\n"
            "clusters:\n- name: k\n  cluster:\n    server: https://h\n"
            "    certificate-authority: missing.pem\n",
            "unable to read certificate-authority",
        ),
    ],
)
def test_bad_kubeconfigs(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_kubeconfig(str(path))


def test_missing_kubeconfig_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unable to read kubeconfig .*nope"):
        load_config(str(tmp_path / "nope"))


def test_in_cluster(tmp_path: Path) -> None:
    for name, data in (("token", "tok\n"), ("ca.crt", "CA"), ("namespace", "agents\n")):
        (tmp_path / name).write_text(data)
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    config = load_in_cluster(str(tmp_path), env)
    assert config.server == "https://[fd00::1]:443"
    assert (config.ca_pem, config.namespace) == (b"CA", "agents")
    assert config.token_file == str(tmp_path / "token")


def test_in_cluster_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT"):
        load_in_cluster(str(tmp_path), {})
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(ConfigError, match="in-cluster token"):
        load_in_cluster(str(tmp_path), env)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("", None),
        ("---\na: 1\n...\nignored: after end\n", {"a": 1}),
        ("a:\n  - x\n  -\n    b: c\n  - 'q: r'\n", {"a": ["x", {"b": "c"}, "q: r"]}),
        (
            'a: "tab\\there"\nb: ~\nc: false\nd:\n',
            {"a": "tab\there", "b": None, "c": False, "d": None},
        ),
        ("url: https://h:1/x#frag\n", {"url": "https://h:1/x#frag"}),
        ("- a: 1\n  b: '2'\n- c\n", [{"a": 1, "b": "2"}, "c"]),
        # go-yaml v2's plain scalars: YAML 1.1 booleans, Go integer forms, floats.
        (
            "a: yes\nb: Off\nc: Y\nd: oN\ne: 'yes'\n",
            {"a": True, "b": False, "c": True, "d": "oN", "e": "yes"},
        ),
        (
            "a: 017\nb: 0x1F\nc: -0b11\nd: 1_000\ne: 08\nf: .5\ng: 1.2.3\n",
            {"a": 15, "b": 31, "c": -3, "d": 1000, "e": 8.0, "f": 0.5, "g": "1.2.3"},
        ),
    ],
)
def test_yaml_subset(text: str, value: object) -> None:
    assert loads(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "a: &anchor x\n",
        "a: |\n  block\n",
        "a: [1, 2]\n",
        "a: 1\na: 2\n",
        "a: 1\n   b: 2\n",
        "a: 'open\n",
        "a: 1\n---\nb: 2\n",
        "\ta: 1\n",
        "just text\n",
    ],
)
def test_yaml_subset_refuses(text: str) -> None:
    with pytest.raises(YamlError):
        loads(text)


def test_rate_limiter_bucket() -> None:
    limiter = RateLimiter(qps=2.0, burst=3, now=0.0)
    # The burst is free, then one token every 1/qps seconds, reservations queue up.
    assert [limiter.reserve(0.0) for _ in range(5)] == [0.0, 0.0, 0.0, 0.5, 1.0]
    # 10 s idle refills the bucket to the burst, not beyond.
    assert [limiter.reserve(11.0) for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]
    unlimited = RateLimiter(qps=-1.0, burst=0, now=0.0)
    assert {unlimited.reserve(0.0) for _ in range(100)} == {0.0}


def test_bad_tls_material_is_a_config_error() -> None:
    bad_ca = ClientConfig(server="https://h", ca_pem=b"not a certificate")
    with pytest.raises(ConfigError, match="invalid TLS material"):
        KubeClient(bad_ca)
    bad_pair = ClientConfig(server="https://h", client_cert_pem=b"x", client_key_pem=b"y")
    with pytest.raises(ConfigError, match="invalid TLS material"):
        KubeClient(bad_pair)


# Every plain spelling go-yaml v2 reads as a boolean (resolve.go), and some it does not.
TRUE_SPELLINGS = ["y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"]
FALSE_SPELLINGS = ["n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"]
REFUSED = {"'true'": "string", '"yes"': "string", "yEs": "string", "1": "number", "0.5": "number"}


def insecure_kubeconfig(tmp_path: Path, value: str) -> str:
    path = tmp_path / "config"
    path.write_text(
        "current-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\n"
        "clusters:\n- name: k\n  cluster:\n    server: https://h\n"
        f"    insecure-skip-tls-verify: {value}\n"
    )
    return str(path)


@pytest.mark.parametrize("value", TRUE_SPELLINGS + FALSE_SPELLINGS + ["~", "null", ""])
def test_insecure_skip_tls_verify_spellings(tmp_path: Path, value: str) -> None:
    config = load_kubeconfig(insecure_kubeconfig(tmp_path, value))
    assert config.insecure_skip_tls_verify is (value in TRUE_SPELLINGS)


@pytest.mark.parametrize(("value", "kind"), REFUSED.items())
def test_insecure_skip_tls_verify_not_a_boolean(tmp_path: Path, value: str, kind: str) -> None:
    """client-go refuses the file, with encoding/json's words (checked against upstream's
    binary in tests/compat/test_kubeconfig.py)."""
    path = insecure_kubeconfig(tmp_path, value)
    message = (
        f'error loading config file "{path}": json: cannot unmarshal {kind} into Go struct '
        "field Cluster.clusters.cluster.insecure-skip-tls-verify of type bool"
    )
    with pytest.raises(ConfigError) as info:
        load_kubeconfig(path)
    assert str(info.value) == message
