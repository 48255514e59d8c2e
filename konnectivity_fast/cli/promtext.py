"""Reading the programs' endpoints from outside: a plain HTTP GET and the Prometheus text
format, for ``konnectivity-fast demo`` and ``konnectivity-fast doctor``.

``Samples`` maps each sample as written (``name{labels}``) to its value and answers the
questions the tools ask: one sample, or the sum of a family's samples whose labels match.
"""

from __future__ import annotations

import http.client
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

__all__ = ["HttpAnswer", "Samples", "http_get", "parse_samples"]

# One HTTP exchange with a program's health or admin server: they answer at once.
HTTP_TIMEOUT = 5.0
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class HttpAnswer:
    status: int  # 0: no answer (the error says why)
    body: str
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200

    def summary(self) -> str:
        """``200 ok``, ``500 no connection to any proxy agent``, or the error."""
        if not self.status:
            return f"no answer ({self.error})"
        return f"{self.status} {self.body.strip()[:80]}"


def http_get(host: str, port: int, path: str, timeout: float = HTTP_TIMEOUT) -> HttpAnswer:
    """GET http://host:port/path, never raising: a failure is an answer with status 0."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return HttpAnswer(resp.status, resp.read().decode("utf-8", "replace"))
    except (OSError, http.client.HTTPException) as exc:
        return HttpAnswer(0, "", str(exc) or type(exc).__name__)
    finally:
        conn.close()


class Samples(Mapping[str, float]):
    """The samples of one scrape."""

    def __init__(self, samples: dict[str, float]) -> None:
        self._samples = samples

    def __getitem__(self, key: str) -> float:
        return self._samples[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._samples)

    def __len__(self) -> int:
        return len(self._samples)

    def matching(self, name: str, **labels: str) -> Iterator[tuple[dict[str, str], float]]:
        """The samples of metric ``name`` whose labels include ``labels``."""
        for key, value in self._samples.items():
            metric, _, rest = key.partition("{")
            if metric != name:
                continue
            have = dict(_LABEL.findall(rest))
            if all(have.get(k) == v for k, v in labels.items()):
                yield have, value

    def total(self, name: str, **labels: str) -> float | None:
        """The sum of the matching samples; None when there is none."""
        values = [value for _, value in self.matching(name, **labels)]
        return sum(values) if values else None

    def value(self, name: str, **labels: str) -> float:
        """Like ``total``, but 0 when absent (a vector shows with its first update)."""
        total = self.total(name, **labels)
        return 0.0 if total is None else total


def parse_samples(text: str) -> Samples:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        if not math.isnan(number):
            samples[name + (labels or "")] = number
    return Samples(samples)
