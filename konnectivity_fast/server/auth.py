"""Agent token authentication (upstream's pkg/server/server.go authenticateAgentViaToken
and validateAuthToken).

``TokenAuthenticator.authenticate(values)`` takes the values of an agent Connect's
``authorization`` metadata and either returns (the agent may connect) or raises
``TokenAuthError`` whose text is upstream's, word for word, so operators' log searches
and alerts keep working:

- header checks first: no value, more than one value, no ``Bearer `` prefix;
- then a TokenReview (audiences = ``--authentication-audience``) on every Connect, with no
  cache, as upstream; every failure from here on is wrapped in
  ``Failed to validate authentication token, err:...``;
- the reviewed user must be ``system:serviceaccount:<namespace>:<name>`` with the
  configured namespace and service account.
"""

from __future__ import annotations

import logging

from konnectivity_fast.kube import KubeClient, KubeError
from konnectivity_fast.verbosity import V
from konnectivity_fast.wire.contract import BEARER_PREFIX

__all__ = ["TokenAuthError", "TokenAuthenticator"]

log = logging.getLogger(__name__)


class TokenAuthError(Exception):
    """The agent is not let in; ``str()`` is upstream's message."""


class TokenAuthenticator:
    """Checks agent tokens against the Kubernetes API (``--agent-namespace``,
    ``--agent-service-account``, ``--authentication-audience``)."""

    def __init__(
        self, client: KubeClient, namespace: str, service_account: str, audience: str
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._service_account = service_account
        self._audience = audience

    async def authenticate(self, authorization_values: list[str]) -> None:
        if not authorization_values:
            raise TokenAuthError("Authentication context was not found in metadata")
        if len(authorization_values) > 1:
            raise TokenAuthError(f"too many ({len(authorization_values)}) tokens are received")
        value = authorization_values[0]
        if not value.startswith(BEARER_PREFIX):
            raise TokenAuthError(f'received token does not have "{BEARER_PREFIX}" prefix')
        try:
            await self._review(value[len(BEARER_PREFIX) :])
        except TokenAuthError as exc:
            raise TokenAuthError(f"Failed to validate authentication token, err:{exc}") from None

    async def _review(self, token: str) -> None:
        try:
            status = await self._client.create_token_review(token, [self._audience])
        except KubeError as exc:
            raise TokenAuthError(f"Failed to authenticate request. err:{exc}") from None
        if status.get("error"):
            raise TokenAuthError(f"lookup failed: {status['error']}")
        if not status.get("authenticated"):
            raise TokenAuthError("lookup failed: service account jwt not valid")
        username = str((status.get("user") or {}).get("username") or "")
        parts = username.split(":")
        if len(parts) != 4:
            raise TokenAuthError("lookup failed: unexpected username format")
        if parts[0] != "system" or parts[1] != "serviceaccount":
            raise TokenAuthError("lookup failed: username returned is not a service account")
        namespace, name = parts[2], parts[3]
        if namespace != self._namespace:
            raise TokenAuthError(
                f'lookup failed: incoming request from "{namespace}" namespace. '
                f'Expected "{self._namespace}"'
            )
        if name != self._service_account:
            raise TokenAuthError(
                f'lookup failed: incoming request from "{name}" service account. '
                f'Expected "{self._service_account}"'
            )
        log.log(V(2), "authenticated agent token of %s", username)
