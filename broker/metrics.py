"""The broker's metrics: counters, gauges and histograms, rendered in Prometheus text format.

Pure: this module does no I/O and reads no clock. ``BrokerState`` records into a ``Metrics``
object as requests move; ``render()`` turns it (plus the gauges the state computes on demand)
into the text exposition format (version 0.0.4) that ``GET /metrics`` serves. Recording is a
dict lookup and a bisect, cheap enough for the broker's hot path.
"""
from __future__ import annotations

import bisect
import math
from typing import Iterable, Optional

# bucket upper bounds (the +Inf bucket is implicit)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
TRANSFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0)
BYTES_BUCKETS = tuple(float(4 ** k * 1024) for k in range(1, 11))    # 4 KiB .. 1 GiB

LabelKey = tuple   # ((name, value), ...) in a fixed order
_INF = math.inf
_bisect_left = bisect.bisect_left


class Histogram:
    """Cumulative-bucket histogram of one metric, one series per label set."""

    def __init__(self, buckets: Iterable[float]):
        self.buckets = tuple(sorted(buckets))
        self.series: dict[LabelKey, list] = {}   # labels -> [counts per bucket + inf, sum, count]

    def observe(self, value: float, labels: LabelKey = ()) -> None:
        # -inf <= value <= inf is False for NaN and None raises: both are rare, so they take
        # the slow path; the broker observes half a dozen values per request
        try:
            if not -_INF < value < _INF:
                return
        except TypeError:
            return
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [[0] * (len(self.buckets) + 1), 0.0, 0]
        s[0][_bisect_left(self.buckets, value)] += 1
        s[1] += value
        s[2] += 1

    def count(self, labels: LabelKey = ()) -> int:
        s = self.series.get(labels)
        return s[2] if s else 0


class Counter:
    def __init__(self) -> None:
        self.series: dict[LabelKey, float] = {}

    def inc(self, labels: LabelKey = (), by: float = 1) -> None:
        self.series[labels] = self.series.get(labels, 0) + by


# name -> (type, help); the one list of what the broker exports
FAMILIES = {
    "disagg_requests_total": ("counter", "Requests by outcome: finished, failed, cancelled, rejected."),
    "disagg_request_errors_total": ("counter", "Requests that ended in an error (or were rejected), by error code."),
    "disagg_requests_in_flight": ("gauge", "Requests the broker holds now."),
    "disagg_queue_depth": ("gauge", "Requests waiting: prefill (for a context or both worker), decode (KV ready, "
                                    "waiting for a generation worker)."),
    "disagg_workers": ("gauge", "Registered workers by role and state (idle: nothing running; busy: some "
                                "slots used; full: no free slot)."),
    "disagg_worker_expirations_total": ("counter", "Workers expired or disconnected, by role."),
    "disagg_kv_blocks_used": ("gauge", "KV cache blocks in use per worker, from its last heartbeat."),
    "disagg_kv_blocks_free": ("gauge", "Free KV cache blocks per worker, from its last heartbeat."),
    "disagg_queue_seconds": ("histogram", "Time from arrival at the broker to first dispatch."),
    "disagg_time_to_first_token_seconds": ("histogram", "Time from arrival at the broker to the first output token."),
    "disagg_time_per_output_token_seconds": ("histogram", "Mean time between output tokens after the first, per "
                                                          "finished request with two or more tokens."),
    "disagg_e2e_request_latency_seconds": ("histogram", "Time from arrival at the broker to the final message, "
                                                        "per finished request."),
    "disagg_kv_transfer_seconds": ("histogram", "KV cache transfer time per request, by transfer backend."),
    "disagg_kv_transfer_bytes": ("histogram", "KV cache bytes moved per request, by transfer backend."),
}

OUTCOMES = ("finished", "failed", "cancelled", "rejected")
ROLES = ("context", "generation", "both")
WORKER_STATES = ("idle", "busy", "full")


class Metrics:
    """What the broker records as it runs; the gauges come from the state at render time."""

    def __init__(self) -> None:
        self.outcomes = Counter()
        self.errors = Counter()
        self.expirations = Counter()
        self.queue = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.tpot = Histogram(TOKEN_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.kv_seconds = Histogram(TRANSFER_BUCKETS)
        self.kv_bytes = Histogram(BYTES_BUCKETS)

    def outcome(self, outcome: str, code: Optional[str] = None) -> None:
        self.outcomes.inc((("outcome", outcome),))
        if code:
            self.errors.inc((("code", code),))

    def render(self, gauges: dict) -> str:
        """Prometheus text. ``gauges``: metric name -> {label key: value}, computed by the state."""
        fam: dict[str, list[str]] = {name: [] for name in FAMILIES}
        for o in OUTCOMES:
            self.outcomes.series.setdefault((("outcome", o),), 0)
        _counter(fam["disagg_requests_total"], "disagg_requests_total", self.outcomes)
        _counter(fam["disagg_request_errors_total"], "disagg_request_errors_total", self.errors)
        for r in ROLES:
            self.expirations.series.setdefault((("role", r),), 0)
        _counter(fam["disagg_worker_expirations_total"], "disagg_worker_expirations_total", self.expirations)
        for name, series in gauges.items():
            fam[name].extend(_sample(name, labels, v) for labels, v in sorted(series.items()))
        for name, h in (("disagg_queue_seconds", self.queue), ("disagg_time_to_first_token_seconds", self.ttft),
                        ("disagg_time_per_output_token_seconds", self.tpot),
                        ("disagg_e2e_request_latency_seconds", self.e2e),
                        ("disagg_kv_transfer_seconds", self.kv_seconds),
                        ("disagg_kv_transfer_bytes", self.kv_bytes)):
            _histogram(fam[name], name, h)
        out = []
        for name, lines in fam.items():
            kind, text = FAMILIES[name]
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)
        return "\n".join(out) + "\n"


def _escape(v: str) -> str:
    return str(v).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labels(labels: LabelKey) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v) if isinstance(v, float) else str(v)


def _sample(name: str, labels: LabelKey, value: float) -> str:
    return f"{name}{_labels(labels)} {_num(value)}"


def _counter(lines: list, name: str, c: Counter) -> None:
    lines.extend(_sample(name, labels, v) for labels, v in sorted(c.series.items()))


def _histogram(lines: list, name: str, h: Histogram) -> None:
    for labels, (counts, total, n) in sorted(h.series.items()):
        cum = 0
        for bound, c in zip(h.buckets + (math.inf,), counts):
            cum += c
            lines.append(_sample(f"{name}_bucket", labels + (("le", _num(float(bound))),), cum))
        lines.append(_sample(f"{name}_sum", labels, total))
        lines.append(_sample(f"{name}_count", labels, n))


def parse(text: str) -> dict:
    """Prometheus text back to {(name, ((label, value), ...)): value}: for tests and tools."""
    import re
    out = {}
    pat = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$')
    lab = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = pat.match(line)
        if m is None:
            raise ValueError(f"not a Prometheus sample line: {line!r}")
        labels = tuple(lab.findall(m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    return out
