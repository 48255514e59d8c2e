"""An asyncio Kubernetes API client: JSON over HTTP/1.1 (TLS), only the calls we need.

``KubeClient(config)`` sends requests as client-go would for our purposes: bearer token
(or client certificate, or basic auth), ``Accept: application/json``, a token-bucket rate
limit of ``config.qps`` requests per second with ``config.burst`` in reserve (client-go's
defaults when the flags are 0; off when qps < 0), and ``REQUEST_TIMEOUT`` per request.

Errors: a response outside 2xx raises ``ApiError``, whose text is the API ``Status``
message (as client-go's ``StatusError``), with ``code`` and ``reason`` alongside; a
transport failure raises ``TransportError`` naming the verb and URL, as Go's
``url.Error`` does. Both are ``KubeError``.

Operations: TokenReview create; Lease get, create, update, delete (optionally with a
resourceVersion precondition), list (label selector) and watch; ServiceAccount create and
TokenRequest create (used by tests and by tools that mint agent tokens).

Invariant: the client owns its connections; ``close()`` releases them. Objects are plain
JSON dicts: callers build and read the few fields they need.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import tempfile
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any
from urllib.parse import quote, urlencode

from konnectivity_fast.kube.config import TOKEN_FILE_REFRESH, ClientConfig, ConfigError
from konnectivity_fast.kube.http import HttpError, HttpPool

__all__ = [
    "REQUEST_TIMEOUT",
    "ApiError",
    "KubeClient",
    "KubeError",
    "RateLimiter",
    "TransportError",
    "make_ssl_context",
]

JSON = dict[str, Any]
# A hung API server must not pin an agent's connect or the lease loop forever; client-go
# has no default timeout, but the callers' periods (15 s) are the natural bound here.
REQUEST_TIMEOUT = 30.0
USER_AGENT = "konnectivity-fast"

# client-go's words for an error response that carries no Status object.
_GENERIC_MESSAGES = {
    400: "the server rejected our request for an unknown reason",
    401: "Unauthorized",
    403: "the server does not allow access to the requested resource",
    404: "the server could not find the requested resource",
    409: "the server reported a conflict",
    429: "the server has received too many requests and has asked us to try again later",
    500: "an error on the server has prevented the request from succeeding",
    503: "the server is currently unable to handle the request",
    504: "the server was unable to return a response in the time allotted",
}
_GENERIC_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class KubeError(Exception):
    """A Kubernetes API call failed."""


class ApiError(KubeError):
    """The API answered with an error status. ``str()`` is the Status message."""

    def __init__(self, code: int, reason: str, message: str, status: JSON | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.status = status or {}

    @property
    def not_found(self) -> bool:
        return self.code == 404 or self.reason == "NotFound"

    @property
    def conflict(self) -> bool:
        return self.code == 409 or self.reason in ("Conflict", "AlreadyExists")

    @property
    def already_exists(self) -> bool:
        return self.reason == "AlreadyExists"


class TransportError(KubeError):
    """No usable answer: connection, TLS, timeout or a malformed response."""


class RateLimiter:
    """client-go's token bucket: ``qps`` tokens a second, at most ``burst`` saved up.
    Each ``acquire`` reserves a token, waiting for it if the bucket is empty; reservations
    keep concurrent callers in order. ``qps <= 0`` means no limit."""

    def __init__(self, qps: float, burst: int, now: float | None = None) -> None:
        self._qps = qps
        self._burst = max(1, burst)
        self._tokens = float(self._burst)
        self._last = time.monotonic() if now is None else now

    def reserve(self, now: float) -> float:
        """Take a token at time ``now``; the seconds to wait before using it."""
        if self._qps <= 0:
            return 0.0
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._qps)
        self._last = now
        self._tokens -= 1
        return -self._tokens / self._qps if self._tokens < 0 else 0.0

    async def acquire(self) -> None:
        delay = self.reserve(time.monotonic())
        if delay > 0:
            await asyncio.sleep(delay)


def make_ssl_context(config: ClientConfig) -> ssl.SSLContext:
    """TLS as client-go sets it up: the kubeconfig CA only (system roots when none),
    optional client certificate, and no verification at all with insecure-skip-tls-verify.
    Unusable certificate or key data raises ``ConfigError``."""
    try:
        return _ssl_context(config)
    except (ssl.SSLError, ValueError) as exc:
        # Bad PEM data in the kubeconfig: a startup error naming it, not a traceback.
        raise ConfigError(f"invalid TLS material in the Kubernetes client config: {exc}") from None


def _ssl_context(config: ClientConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.insecure_skip_tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif config.ca_pem:
        ctx.load_verify_locations(cadata=config.ca_pem.decode("ascii", "replace"))
    else:
        ctx.load_default_certs()
    if config.client_cert_pem and config.client_key_pem:
        # The ssl module loads a key pair only from files: write them to a private
        # folder for the duration of the call.
        with tempfile.TemporaryDirectory(prefix="kf-kube-") as folder:
            cert = os.path.join(folder, "cert.pem")
            key = os.path.join(folder, "key.pem")
            for path, data in ((cert, config.client_cert_pem), (key, config.client_key_pem)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class KubeClient:
    """One API server; safe to share between tasks of one event loop."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        ctx = make_ssl_context(config) if config.use_tls else None
        self._pool = HttpPool(config.host, config.port, ctx, config.tls_server_name)
        self._limiter = RateLimiter(config.qps, config.burst)
        self._token = config.token
        self._token_read_at = -TOKEN_FILE_REFRESH

    async def close(self) -> None:
        await self._pool.close()

    # --- generic ----------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: JSON | None = None,
        query: Mapping[str, str] | None = None,
    ) -> JSON:
        """Send one request and return the decoded JSON body of a 2xx response."""
        target, headers = self._prepare(path, query)
        payload = None
        if body is not None:
            payload = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        await self._limiter.acquire()
        url = self.config.server + path
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                response = await self._pool.request(method, target, headers, payload)
        except TimeoutError:
            raise TransportError(f'{_verb(method)} "{url}": context deadline exceeded') from None
        except HttpError as exc:
            raise TransportError(f'{_verb(method)} "{url}": {exc}') from None
        if not 200 <= response.status < 300:
            raise _api_error(response.status, response.body)
        try:
            decoded = json.loads(response.body) if response.body else {}
        except ValueError:
            raise TransportError(f'{_verb(method)} "{url}": response is not JSON') from None
        if not isinstance(decoded, dict):
            raise TransportError(f'{_verb(method)} "{url}": response is not a JSON object')
        return decoded

    def _prepare(self, path: str, query: Mapping[str, str] | None) -> tuple[str, dict[str, str]]:
        target = self.config.path_prefix + quote(path)
        if query:
            target += "?" + urlencode(query)
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        auth = self._authorization()
        if auth:
            headers["Authorization"] = auth
        return target, headers

    async def watch(
        self, path: str, query: Mapping[str, str] | None = None
    ) -> AsyncGenerator[tuple[str, JSON], None]:
        """Watch a collection: yields ``(type, object)`` for each event (``ADDED``,
        ``MODIFIED``, ``DELETED``, ``BOOKMARK``) until the server ends the watch. An
        ``ERROR`` event (e.g. 410 Gone for a too old resourceVersion) raises ``ApiError``.
        Only opening the watch is bounded by ``REQUEST_TIMEOUT``."""
        target, headers = self._prepare(path, {**(query or {}), "watch": "1"})
        await self._limiter.acquire()
        url = self.config.server + path
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                response, lines = await self._pool.stream_lines(target, headers)
        except TimeoutError:
            raise TransportError(f'Get "{url}": context deadline exceeded') from None
        except HttpError as exc:
            raise TransportError(f'Get "{url}": {exc}') from None
        if lines is None:
            raise _api_error(response.status, response.body)
        async with contextlib.aclosing(lines):
            try:
                async for line in lines:
                    event = json.loads(line)
                    kind, obj = str(event.get("type", "")), event.get("object") or {}
                    if kind == "ERROR":
                        raise _api_error(int(obj.get("code") or 500), json.dumps(obj).encode())
                    yield kind, obj
            except HttpError as exc:
                raise TransportError(f'Get "{url}": {exc}') from None
            except (ValueError, AttributeError):
                raise TransportError(f'Get "{url}": malformed watch event') from None

    def _authorization(self) -> str | None:
        config = self.config
        if config.token_file and time.monotonic() - self._token_read_at >= TOKEN_FILE_REFRESH:
            try:
                with open(config.token_file, encoding="utf-8") as f:
                    self._token = f.read().strip()
                self._token_read_at = time.monotonic()
            except OSError:
                pass  # keep the last token, as client-go's cached token source does
        if self._token:
            return f"Bearer {self._token}"
        if config.basic_auth:
            pair = ":".join(config.basic_auth).encode()
            return "Basic " + base64.b64encode(pair).decode()
        return None

    # --- authentication.k8s.io --------------------------------------------------------

    async def create_token_review(self, token: str, audiences: list[str]) -> JSON:
        """TokenReview create; returns the review's ``status``."""
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences},
        }
        result = await self.request(
            "POST", "/apis/authentication.k8s.io/v1/tokenreviews", body=review
        )
        status = result.get("status")
        return status if isinstance(status, dict) else {}

    # --- coordination.k8s.io Leases ---------------------------------------------------

    @staticmethod
    def leases_path(namespace: str, name: str = "") -> str:
        """The API path of a namespace's Leases (or of one by ``name``)."""
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        return f"{path}/{name}" if name else path

    async def get_lease(self, namespace: str, name: str) -> JSON:
        return await self.request("GET", self.leases_path(namespace, name))

    async def create_lease(self, namespace: str, lease: JSON) -> JSON:
        return await self.request("POST", self.leases_path(namespace), body=lease)

    async def update_lease(self, namespace: str, lease: JSON) -> JSON:
        """PUT; a ``metadata.resourceVersion`` in ``lease`` makes it conditional."""
        name = lease["metadata"]["name"]
        return await self.request("PUT", self.leases_path(namespace, name), body=lease)

    async def delete_lease(
        self, namespace: str, name: str, resource_version: str | None = None
    ) -> None:
        body: JSON | None = None
        if resource_version is not None:
            body = {
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "preconditions": {"resourceVersion": resource_version},
            }
        await self.request("DELETE", self.leases_path(namespace, name), body=body)

    async def list_leases(self, namespace: str, label_selector: str = "") -> list[JSON]:
        query = {"labelSelector": label_selector} if label_selector else None
        result = await self.request("GET", self.leases_path(namespace), query=query)
        items = result.get("items") or []
        return [item for item in items if isinstance(item, dict)]

    def watch_leases(
        self,
        namespace: str,
        label_selector: str = "",
        resource_version: str = "",
        timeout_seconds: int | None = None,
    ) -> AsyncGenerator[tuple[str, JSON], None]:
        """Lease events after ``resource_version`` (from a list); see ``watch``."""
        query = {"allowWatchBookmarks": "true"}
        if label_selector:
            query["labelSelector"] = label_selector
        if resource_version:
            query["resourceVersion"] = resource_version
        if timeout_seconds is not None:
            query["timeoutSeconds"] = str(timeout_seconds)
        return self.watch(self.leases_path(namespace), query)

    # --- core/v1 ServiceAccounts and TokenRequests ------------------------------------

    async def create_service_account(self, namespace: str, name: str) -> JSON:
        body = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}
        return await self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", body=body
        )

    async def create_token(
        self, namespace: str, service_account: str, audiences: list[str], seconds: int = 3600
    ) -> str:
        """A bound service account token (TokenRequest) for ``audiences``."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": audiences, "expirationSeconds": seconds},
        }
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"
        result = await self.request("POST", path, body=body)
        return str(result.get("status", {}).get("token", ""))


def _verb(method: str) -> str:
    # Go's url.Error names the method in title case: `Post "https://...": ...`.
    return method[:1] + method[1:].lower()


def _api_error(code: int, body: bytes) -> ApiError:
    try:
        status = json.loads(body) if body else None
    except ValueError:
        status = None
    if isinstance(status, dict) and status.get("kind") == "Status":
        return ApiError(
            int(status.get("code") or code),
            str(status.get("reason") or _GENERIC_REASONS.get(code, "Unknown")),
            str(status.get("message") or _GENERIC_MESSAGES.get(code, f"status {code}")),
            status,
        )
    message = _GENERIC_MESSAGES.get(code, f"an error on the server (status {code})")
    text = body[:200].decode("utf-8", "replace").strip()
    if text:
        message += f" ({text})"
    return ApiError(code, _GENERIC_REASONS.get(code, "Unknown"), message)
