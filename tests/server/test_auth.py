"""Agent token authentication against a real kube-apiserver: TokenRequest tokens of the
right and wrong audience, namespace and service account, static non-service-account
users, a client without rights, and the header checks, each with upstream's message."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from konnectivity_fast.kube import KubeClient, load_config
from konnectivity_fast.server.auth import TokenAuthenticator, TokenAuthError
from tests.support import kubeapi
from tests.support.kubeapi import ISSUER, KubeCluster, admin_client, create_namespace
from tests.support.net import RunFn

kube_cluster = kubeapi.kube_cluster
pytestmark = pytest.mark.timeout(120)

AUDIENCE = "kf-proxy-server"
AGENT_SA = "konnectivity-agent"
WRAP = "Failed to validate authentication token, err:"


@dataclass(frozen=True)
class Tokens:
    namespace: str
    other_namespace: str
    good: str
    wrong_audience: str
    wrong_namespace: str
    wrong_sa: str
    wrong_audience_error: str  # what the API says about wrong_audience


@pytest.fixture(scope="module")
def tokens(kube_cluster: KubeCluster) -> Tokens:
    async def make() -> Tokens:
        admin = admin_client(kube_cluster)
        try:
            ns = await create_namespace(admin, "agents")
            other_ns = await create_namespace(admin, "elsewhere")
            for namespace, name in ((ns, AGENT_SA), (ns, "other"), (other_ns, AGENT_SA)):
                await admin.create_service_account(namespace, name)
            wrong_audience = await admin.create_token(ns, AGENT_SA, ["someone-else"])
            review = await admin.create_token_review(wrong_audience, [AUDIENCE])
            return Tokens(
                ns,
                other_ns,
                await admin.create_token(ns, AGENT_SA, [AUDIENCE]),
                wrong_audience,
                await admin.create_token(other_ns, AGENT_SA, [AUDIENCE]),
                await admin.create_token(ns, "other", [AUDIENCE]),
                str(review.get("error", "")),
            )
        finally:
            await admin.close()

    return asyncio.run(make())


async def check(
    cluster: KubeCluster,
    namespace: str,
    values: list[str],
    *,
    audience: str = AUDIENCE,
    kubeconfig: str | None = None,
) -> str | None:
    """Authenticate ``values``; the error message, or None when let in."""
    client = KubeClient(load_config(kubeconfig or cluster.kubeconfig))
    try:
        auth = TokenAuthenticator(client, namespace, AGENT_SA, audience)
        await auth.authenticate(values)
    except TokenAuthError as exc:
        return str(exc)
    finally:
        await client.close()
    return None


def test_agent_token_with_the_right_audience_passes(
    kube_cluster: KubeCluster, tokens: Tokens, run: RunFn
) -> None:
    assert run(check(kube_cluster, tokens.namespace, [f"Bearer {tokens.good}"])) is None


def test_wrong_tokens(kube_cluster: KubeCluster, tokens: Tokens, run: RunFn) -> None:
    ns = tokens.namespace
    # The API server explains the audience mismatch; upstream passes its words on.
    assert "audience" in tokens.wrong_audience_error
    cases = {
        tokens.wrong_audience: f"{WRAP}lookup failed: {tokens.wrong_audience_error}",
        tokens.wrong_namespace: (
            f'{WRAP}lookup failed: incoming request from "{tokens.other_namespace}" '
            f'namespace. Expected "{ns}"'
        ),
        tokens.wrong_sa: (
            f'{WRAP}lookup failed: incoming request from "other" service account. '
            f'Expected "{AGENT_SA}"'
        ),
        # Not a JWT and no static token: the authenticator chain's own error.
        "garbage": f"{WRAP}lookup failed: invalid bearer token",
    }
    for token, message in cases.items():
        assert run(check(kube_cluster, ns, [f"Bearer {token}"])) == message


def test_users_that_are_not_service_accounts(kube_cluster: KubeCluster, run: RunFn) -> None:
    # Static tokens are valid for the API server's own audience only.
    plain, colons = kubeapi.STATIC_TOKENS
    assert run(check(kube_cluster, "ns", [f"Bearer {plain}"], audience=ISSUER)) == (
        f"{WRAP}lookup failed: unexpected username format"
    )
    assert run(check(kube_cluster, "ns", [f"Bearer {colons}"], audience=ISSUER)) == (
        f"{WRAP}lookup failed: username returned is not a service account"
    )


def test_client_without_rights(kube_cluster: KubeCluster, tokens: Tokens, run: RunFn) -> None:
    nobody = kube_cluster.user_kubeconfig("nobody")
    message = run(
        check(kube_cluster, tokens.namespace, [f"Bearer {tokens.good}"], kubeconfig=nobody)
    )
    assert message == (
        f"{WRAP}Failed to authenticate request. err:tokenreviews.authentication.k8s.io is "
        'forbidden: User "nobody" cannot create resource "tokenreviews" in API group '
        '"authentication.k8s.io" at the cluster scope'
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([], "Authentication context was not found in metadata"),
        (["Bearer a", "Bearer b"], "too many (2) tokens are received"),
        (["bearer abc"], 'received token does not have "Bearer " prefix'),
        (["Basic abc"], 'received token does not have "Bearer " prefix'),
        ([""], 'received token does not have "Bearer " prefix'),
    ],
)
def test_header_checks(run: RunFn, tmp_path: Path, values: list[str], message: str) -> None:
    # Checked before any API call: the client points at a closed port.
    path = tmp_path / "config"
    path.write_text(
        "current-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\n"
        "clusters:\n- name: k\n  cluster:\n    server: https://127.0.0.1:1\n"
    )

    async def body() -> str | None:
        client = KubeClient(load_config(str(path)))
        try:
            await TokenAuthenticator(client, "ns", AGENT_SA, AUDIENCE).authenticate(values)
        except TokenAuthError as exc:
            return str(exc)
        finally:
            await client.close()
        return None

    assert run(body()) == message
