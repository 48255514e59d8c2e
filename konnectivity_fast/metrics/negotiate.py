"""The Content-Type of a scrape's answer, as client_golang's promhttp handler negotiates it.

The body is the same text whatever the answer: our metric and label names are valid legacy
names, so no escaping scheme changes them; only the header's ``escaping=`` parameter varies.
"""

from __future__ import annotations

__all__ = ["TEXT_CONTENT_TYPE", "negotiate_content_type"]

_TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8; escaping="
# What Go's handler answers a scrape that sends no Accept header.
TEXT_CONTENT_TYPE = _TEXT_TYPE + "underscores"
_ESCAPING_SCHEMES = frozenset({"allow-utf-8", "underscores", "dots", "values"})


def negotiate_content_type(accept: str | None) -> str:
    """The Content-Type client_golang's handler answers a scrape with, given its Accept header.

    As Go's ``expfmt.Negotiate`` does, the entries are taken by falling q; each known
    ``escaping=`` parameter met on the way sets the scheme (``underscores`` by default), and
    the first ``text/plain`` entry with version 0.0.4 or none ends the search. We offer no
    protobuf or OpenMetrics, so those entries only contribute their escaping parameter.
    """
    scheme = "underscores"
    entries: list[tuple[float, int, int, str, dict[str, str]]] = []
    for part in (accept or "").split(","):
        media, *raw_params = (p.strip() for p in part.split(";"))
        if not media:
            continue
        params: dict[str, str] = {}
        q = 1.0
        for raw in raw_params:
            key, _, value = raw.partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
            elif key:
                params[key] = value
        wild = media.count("*")
        entries.append((-q, wild, -len(params), media.lower(), params))
    entries.sort(key=lambda e: e[:3])
    for _, _, _, media, params in entries:
        if params.get("escaping", "") in _ESCAPING_SCHEMES:
            scheme = params["escaping"]
        if media == "text/plain" and params.get("version", "") in ("0.0.4", ""):
            break
    return _TEXT_TYPE + scheme
