"""Counters, gauges and histograms, and their exposition in the Prometheus text format 0.0.4.

The output matches what Go's client_golang (``Registry.Gather`` + ``expfmt``) writes, byte for
byte, because scrapers, dashboards and upstream's own tests read it:

- families sorted by name; each opens with ``# HELP name text`` (backslash and newline escaped)
  and ``# TYPE name counter|gauge|histogram``; no blank lines;
- a sample's labels are written sorted by label name, ``{a="x",b="y"}``, label values with
  backslash, double quote and newline escaped; a histogram's ``le`` comes last;
- within a family, samples are sorted by their label values, compared in label-name order;
- values as Go's ``strconv.FormatFloat(v, 'g', -1, 64)``: the shortest digits that read back
  to the same float, in exponent form when the decimal exponent is below -4 or at least 6
  (``1e-05``, ``0.0001``, ``123456``, ``1e+06``, ``1.234567e+06``), and ``NaN``, ``+Inf``,
  ``-Inf``; bucket and ``_count`` values are integers;
- a vector (``CounterVec``, ``GaugeVec``, ``HistogramVec``, even one with no label names)
  shows nothing, not even HELP and TYPE, until its first child is created with ``labels()``;
  a plain ``Counter``, ``Gauge`` or ``Histogram`` shows from registration, at 0;
- names are kept as given: no ``_total`` suffix and no ``_created`` series are added.

Updating is on hot paths and everything runs on one event loop: a child's ``inc()`` is a plain
attribute add, with no locks. Resolve a child once with ``labels()`` and keep it where the
label values are fixed; note that creating a child makes its series visible at 0, as Go's
``WithLabelValues`` does.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import pairwise
from operator import itemgetter
from typing import Generic, Protocol, TypeVar

from konnectivity_fast.metrics.negotiate import TEXT_CONTENT_TYPE

__all__ = [
    "DEFAULT_BUCKETS",
    "Collector",
    "Counter",
    "CounterChild",
    "CounterVec",
    "Gauge",
    "GaugeChild",
    "GaugeVec",
    "Histogram",
    "HistogramChild",
    "HistogramVec",
    "Registry",
    "escape_help",
    "escape_label_value",
    "format_value",
]

# client_golang's DefBuckets, used when a histogram names no buckets.
DEFAULT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

# Go keeps a counter's integral increments in a uint64 and the others in a float64, and
# reports their sum; an increment takes the integral path only when it fits a uint64.
_UINT64_LIMIT = 18446744073709551616.0


# --- text formatting ---------------------------------------------------------------------------


def format_value(v: float) -> str:
    """Format ``v`` as client_golang's text exposition does (``strconv`` 'g', shortest)."""
    v = float(v)
    if v.is_integer() and -1e6 < v < 1e6:  # also turns -0.0 into "0", as Go's f == 0 case
        return str(int(v))
    if math.isnan(v):
        return "NaN"
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    # repr() gives the shortest digits that round-trip, as Go's shortest formatting does;
    # only the layout differs, so take the digits and the decimal point and lay them out again.
    text = repr(v)
    sign = ""
    if text[0] == "-":
        sign, text = "-", text[1:]
    mantissa, _, exponent = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    point = len(whole) + (int(exponent) if exponent else 0)  # value = 0.<digits> * 10**point
    significant = digits.lstrip("0")
    point -= len(digits) - len(significant)
    digits = significant.rstrip("0")
    exp10 = point - 1
    if exp10 < -4 or exp10 >= 6:  # Go's thresholds for the shortest 'g' format
        head = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{head}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


def escape_help(text: str) -> str:
    """Escape a HELP text: backslash and newline (a double quote stays as it is)."""
    if "\\" in text or "\n" in text:
        text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text


def escape_label_value(value: str) -> str:
    """Escape a label value: backslash, double quote and newline."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


# --- children: what the hot paths touch -------------------------------------------------------


class CounterChild:
    """One counter series. ``inc()`` is a plain attribute add."""

    __slots__ = ("_float", "_int")

    def __init__(self) -> None:
        self._int = 0
        self._float = 0.0

    def inc(self) -> None:
        self._int += 1

    def add(self, amount: float) -> None:
        """Add ``amount`` (not negative). Integral amounts are kept apart from the others,
        as Go does, so mixed sums round the same way."""
        if amount < 0:
            raise ValueError("counter cannot decrease in value")
        if isinstance(amount, int):
            self._int += amount
        elif amount.is_integer() and amount < _UINT64_LIMIT:
            self._int += int(amount)
        else:
            self._float += amount

    @property
    def value(self) -> float:
        return float(self._int) + self._float

    def _reset(self) -> None:
        self._int = 0
        self._float = 0.0


class GaugeChild:
    """One gauge series. ``value`` may be read and written directly."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self) -> None:
        self.value += 1.0

    def dec(self) -> None:
        self.value -= 1.0

    def add(self, amount: float) -> None:
        self.value += amount

    def sub(self, amount: float) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)

    def _reset(self) -> None:
        self.value = 0.0


class HistogramChild:
    """One histogram series: per-bucket counts (not cumulative), sum and count."""

    __slots__ = ("_bounds", "_counts", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        # one slot per upper bound, and a last one for values above them all (and NaN)
        self._counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        if value == value:  # noqa: PLR0124 - not NaN, the cheapest way to ask
            self._counts[bisect_left(self._bounds, value)] += 1
        else:  # NaN is below no bound: Go counts it in +Inf only
            self._counts[-1] += 1
        self.sum += value
        self.count += 1

    def cumulative_counts(self) -> list[int]:
        """Counts per upper bound, cumulative, without the +Inf bucket (that is ``count``)."""
        total = 0
        result = []
        for n in self._counts[:-1]:
            total += n
            result.append(total)
        return result

    def _reset(self) -> None:
        self._counts = [0] * (len(self._bounds) + 1)
        self.sum = 0.0
        self.count = 0


# --- families ---------------------------------------------------------------------------------


class Collector(Protocol):
    """What a registry holds: something that names its families and writes their text."""

    @property
    def names(self) -> tuple[str, ...]: ...

    def collect(self) -> list[tuple[str, str]]:
        """``(family name, text block)`` pairs, a block holding HELP, TYPE and the samples;
        a family with no sample is left out."""
        ...


def _check_name(name: str) -> None:
    if not _METRIC_NAME.match(name):
        raise ValueError(f"invalid metric name {name!r}")


def _header(name: str, help_text: str, type_name: str) -> str:
    return f"# HELP {name} {escape_help(help_text)}\n# TYPE {name} {type_name}\n"


class _PlainMetric:
    """Registration details of a metric without labels (a mixin for the plain classes)."""

    __slots__ = ()
    name: str
    help: str
    type_name: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,)


class Counter(CounterChild, _PlainMetric):
    """A counter without labels, shown at 0 from registration."""

    __slots__ = ("help", "name")
    type_name = "counter"

    def __init__(self, name: str, help: str, *, registry: Registry | None = None) -> None:
        super().__init__()
        _check_name(name)
        self.name = name
        self.help = help
        if registry is not None:
            registry.register(self)

    def collect(self) -> list[tuple[str, str]]:
        head = _header(self.name, self.help, "counter")
        return [(self.name, f"{head}{self.name} {format_value(self.value)}\n")]

    def reset(self) -> None:
        self._reset()


class Gauge(GaugeChild, _PlainMetric):
    """A gauge without labels, shown at 0 from registration."""

    __slots__ = ("help", "name")
    type_name = "gauge"

    def __init__(self, name: str, help: str, *, registry: Registry | None = None) -> None:
        super().__init__()
        _check_name(name)
        self.name = name
        self.help = help
        if registry is not None:
            registry.register(self)

    def collect(self) -> list[tuple[str, str]]:
        head = _header(self.name, self.help, "gauge")
        return [(self.name, f"{head}{self.name} {format_value(self.value)}\n")]

    def reset(self) -> None:
        self._reset()


def _bounds(buckets: Sequence[float] | None) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in (DEFAULT_BUCKETS if buckets is None else buckets))
    if bounds and bounds[-1] == math.inf:  # Go drops a trailing +Inf: it is always implied
        bounds = bounds[:-1]
    if not bounds:
        bounds = DEFAULT_BUCKETS
    for low, high in pairwise(bounds):
        if not low < high:
            raise ValueError("histogram buckets must be in increasing order")
    return bounds


def _histogram_lines(
    out: list[str], name: str, labels: str, child: HistogramChild, les: Sequence[str]
) -> None:
    """Append one histogram series; ``labels`` is the rendered pairs, each followed by ','."""
    for le, n in zip(les, child.cumulative_counts(), strict=True):
        out.append(f'{name}_bucket{{{labels}le="{le}"}} {n}\n')
    out.append(f'{name}_bucket{{{labels}le="+Inf"}} {child.count}\n')
    pairs = "{" + labels[:-1] + "}" if labels else ""
    out.append(f"{name}_sum{pairs} {format_value(child.sum)}\n")
    out.append(f"{name}_count{pairs} {child.count}\n")


class Histogram(HistogramChild, _PlainMetric):
    """A histogram without labels, shown (all zero) from registration."""

    __slots__ = ("_les", "help", "name")
    type_name = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        *,
        buckets: Sequence[float] | None = None,
        registry: Registry | None = None,
    ) -> None:
        bounds = _bounds(buckets)
        super().__init__(bounds)
        _check_name(name)
        self.name = name
        self.help = help
        self._les = tuple(format_value(b) for b in bounds)
        if registry is not None:
            registry.register(self)

    @property
    def buckets(self) -> tuple[float, ...]:
        return self._bounds

    def collect(self) -> list[tuple[str, str]]:
        out = [_header(self.name, self.help, "histogram")]
        _histogram_lines(out, self.name, "", self, self._les)
        return [(self.name, "".join(out))]

    def reset(self) -> None:
        self._reset()


_Child = TypeVar("_Child", CounterChild, GaugeChild, HistogramChild)


class _Vec(Generic[_Child]):
    """A family whose series are created on first use, one per tuple of label values."""

    type_name = ""

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str], registry: Registry | None
    ) -> None:
        _check_name(name)
        names = tuple(labelnames)
        for label in names:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate label names in {names!r}")
        self.name = name
        self.help = help
        self.labelnames = names
        # Go writes label pairs sorted by name and sorts series by values in that order.
        self._order = tuple(sorted(range(len(names)), key=names.__getitem__))
        self._children: dict[tuple[str, ...], _Child] = {}
        self._rendered: dict[tuple[str, ...], str] = {}
        if registry is not None:
            registry.register(self)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,)

    def labels(self, *values: str) -> _Child:
        """The series for ``values`` (one per label name, in declaration order), created
        (and so shown, at 0) on first use."""
        try:
            return self._children[values]
        except KeyError:
            pass
        if len(values) != len(self.labelnames):
            raise ValueError(
                f"{self.name}: expected {len(self.labelnames)} label values, got {len(values)}"
            )
        for value in values:
            if not isinstance(value, str):
                raise TypeError(f"{self.name}: label values must be str, got {value!r}")
        child = self._new_child()
        self._children[values] = child
        return child

    def _new_child(self) -> _Child:
        raise NotImplementedError

    def collect(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def remove(self, *values: str) -> bool:
        """Drop one series; tell whether it existed."""
        self._rendered.pop(values, None)
        return self._children.pop(values, None) is not None

    def clear(self) -> None:
        """Drop every series: the family disappears from the exposition until next use."""
        self._children.clear()
        self._rendered.clear()

    def reset(self) -> None:
        self.clear()

    def children(self) -> dict[tuple[str, ...], _Child]:
        """A copy of the series by label values (for tests and adapters)."""
        return dict(self._children)

    def _sorted(self) -> list[tuple[str, _Child]]:
        """``(rendered label pairs, child)`` in client_golang's order; each rendered pair is
        followed by a comma."""
        rendered = self._rendered
        order = self._order
        names = self.labelnames
        rows = []
        for values, child in self._children.items():
            text = rendered.get(values)
            if text is None:
                text = "".join(f'{names[i]}="{escape_label_value(values[i])}",' for i in order)
                rendered[values] = text
            rows.append((tuple(values[i] for i in order), text, child))
        rows.sort(key=itemgetter(0))
        return [(text, child) for _, text, child in rows]


_Scalar = TypeVar("_Scalar", CounterChild, GaugeChild)


class _ScalarVec(_Vec[_Scalar]):
    """A family of counters or gauges: one ``value`` per series."""

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        registry: Registry | None = None,
    ) -> None:
        super().__init__(name, help, labelnames, registry)

    def collect(self) -> list[tuple[str, str]]:
        if not self._children:
            return []
        name = self.name
        out = [_header(name, self.help, self.type_name)]
        for labels, child in self._sorted():
            pairs = "{" + labels[:-1] + "}" if labels else ""
            out.append(f"{name}{pairs} {format_value(child.value)}\n")
        return [(name, "".join(out))]


class CounterVec(_ScalarVec[CounterChild]):
    """Counters by label values; nothing is shown until the first ``labels()``."""

    type_name = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild()


class GaugeVec(_ScalarVec[GaugeChild]):
    """Gauges by label values; nothing is shown until the first ``labels()``."""

    type_name = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild()


class HistogramVec(_Vec[HistogramChild]):
    """Histograms by label values; nothing is shown until the first ``labels()``."""

    type_name = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] | None = None,
        registry: Registry | None = None,
    ) -> None:
        if "le" in labelnames:
            raise ValueError('"le" is reserved in histograms')
        self._bounds = _bounds(buckets)
        self._les = tuple(format_value(b) for b in self._bounds)
        super().__init__(name, help, labelnames, registry)

    @property
    def buckets(self) -> tuple[float, ...]:
        return self._bounds

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self._bounds)

    def collect(self) -> list[tuple[str, str]]:
        if not self._children:
            return []
        out = [_header(self.name, self.help, "histogram")]
        for labels, child in self._sorted():
            _histogram_lines(out, self.name, labels, child, self._les)
        return [(self.name, "".join(out))]


# --- the registry -----------------------------------------------------------------------------

_C = TypeVar("_C", bound=Collector)


class Registry:
    """Holds collectors and writes their families, sorted by name, as one text exposition."""

    # What Go's handler answers a scrape that sends no Accept header.
    CONTENT_TYPE = TEXT_CONTENT_TYPE

    def __init__(self) -> None:
        self._collectors: list[Collector] = []
        self._names: set[str] = set()

    def register(self, collector: _C) -> _C:
        names = collector.names
        taken = self._names.intersection(names)
        if taken or len(set(names)) != len(names):
            raise ValueError(f"metric already registered: {sorted(taken) or names}")
        self._names.update(names)
        self._collectors.append(collector)
        return collector

    def registered(self, collector: Collector) -> bool:
        return collector in self._collectors

    def unregister(self, collector: Collector) -> None:
        self._collectors.remove(collector)
        self._names.difference_update(collector.names)

    def collectors(self) -> Iterable[Collector]:
        return tuple(self._collectors)

    def expose_text(self) -> str:
        blocks: list[tuple[str, str]] = []
        for collector in self._collectors:
            blocks.extend(collector.collect())
        blocks.sort(key=itemgetter(0))
        return "".join(text for _, text in blocks)

    def expose(self) -> bytes:
        """The text exposition (format 0.0.4), UTF-8; serve it as ``CONTENT_TYPE`` or as
        ``negotiate_content_type(accept)`` says."""
        return self.expose_text().encode("utf-8", "backslashreplace")
