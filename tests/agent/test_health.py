"""The agent's HTTP helpers that avoid heavy imports agree with the standard library."""

from __future__ import annotations

import email.utils
import html

from konnectivity_fast.agent.health import _HTML_ESCAPES, Request, admin_routes
from konnectivity_fast.transport.http import http_date as _http_date


def test_http_date_matches_email_utils() -> None:
    for t in (0.0, 951782400.0, 1_700_000_000.5, 1_800_000_000.0):
        assert _http_date(t) == email.utils.formatdate(t, usegmt=True)


def test_redirect_escapes_like_html() -> None:
    target = "/x?a=<b>&c=\"d'"
    # Go's html.EscapeString spells the quotes &#34; and &#39;.
    go_escaped = html.escape(target).replace("&quot;", "&#34;").replace("&#x27;", "&#39;")
    assert target.translate(_HTML_ESCAPES) == go_escaped
    (handler,) = admin_routes(8093).values()
    status, _, body, extra = handler(Request("GET", "/metrics", "q=1", {"host": "[::1]:8094"}))
    assert (status, extra) == (301, (("Location", "//[::1]:8093/metrics?q=1"),))
    assert body == b'<a href="//[::1]:8093/metrics?q=1">Moved Permanently</a>.\n\n'
