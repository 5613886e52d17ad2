"""The broker's metrics: counters and histograms recorded as requests move, exported with
prometheus_client.

Pure: this module does no I/O and reads no clock. ``BrokerState`` records into a ``Metrics``
object on its hot path with plain counters and a bisect (about half a microsecond each, where a
prometheus_client ``Histogram.observe`` costs 2 to 5: the broker records half a dozen values per
request). At scrape time a custom collector turns them, plus gauges computed from the state,
into prometheus_client metric families in a registry private to that ``Metrics`` (never the
global default registry: one process may hold many states), which ``generate_latest`` renders.
"""
from __future__ import annotations

import bisect
import math
from itertools import accumulate
from typing import Callable, Iterable, Iterator, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from broker.protocol import Code

# bucket upper bounds (the +Inf bucket is implicit)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
TRANSFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0)
BYTES_BUCKETS = tuple(float(4 ** k * 1024) for k in range(1, 11))    # 4 KiB .. 1 GiB

LabelKey = tuple   # ((name, value), ...) in the order of the family's label names
_INF = math.inf
_bisect_left = bisect.bisect_left


class Histogram:
    """Cumulative-bucket histogram of one metric, one series per label set."""

    def __init__(self, buckets: Iterable[float]):
        self.buckets = tuple(sorted(buckets))
        self.series: dict[LabelKey, list] = {}   # labels -> [counts per bucket + inf, sum]

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
            s = self.series[labels] = [[0] * (len(self.buckets) + 1), 0.0]
        s[0][_bisect_left(self.buckets, value)] += 1
        s[1] += value


class Counter:
    def __init__(self) -> None:
        self.series: dict[LabelKey, float] = {}

    def inc(self, labels: LabelKey = (), by: float = 1) -> None:
        self.series[labels] = self.series.get(labels, 0) + by


# name -> (type, label names, help); the one list of what the broker exports
FAMILIES = {
    "disagg_requests_total": ("counter", ("outcome",),
                              "Requests by outcome: finished, failed, cancelled, rejected."),
    "disagg_request_errors_total": ("counter", ("code",),
                                    "Requests that ended in an error (or were rejected), by error code."),
    "disagg_requests_in_flight": ("gauge", (), "Requests the broker holds now."),
    "disagg_queue_depth": ("gauge", ("queue",), "Requests waiting: prefill (for a context or both worker), decode "
                                                "(KV ready, waiting for a generation worker)."),
    "disagg_workers": ("gauge", ("role", "state"), "Registered workers by role and state (idle: nothing running; "
                                                   "draining: leaving, taking no new work; "
                                                   "busy: some slots used; full: no free slot)."),
    "disagg_worker_expirations_total": ("counter", ("role",), "Workers expired or disconnected, by role."),
    "disagg_stream_migrations_total": ("counter", (), "Requests continued on another worker after the "
                                                      "one generating them died (stream migration)."),
    "disagg_context_skipped_total": ("counter", (), "Requests whose context phase was skipped: a generation "
                                                    "worker prefilled them itself, the part of the prompt "
                                                    "it did not hold cached being short (conditional "
                                                    "disaggregation)."),
    "disagg_prefill_prompt_tokens_total": ("counter", (), "Prompt tokens of every prefill."),
    "disagg_prefill_cached_tokens_total": ("counter", (), "Prompt tokens of every prefill that the worker's "
                                                          "prefix cache held (not computed)."),
    "disagg_kv_blocks_used": ("gauge", ("worker", "role"),
                              "KV cache blocks in use per worker, from its last heartbeat."),
    "disagg_kv_blocks_free": ("gauge", ("worker", "role"), "Free KV cache blocks per worker, from its last heartbeat."),
    "disagg_queue_seconds": ("histogram", (), "Time from arrival at the broker to first dispatch."),
    "disagg_time_to_first_token_seconds": ("histogram", (),
                                           "Time from arrival at the broker to the first output token."),
    "disagg_time_per_output_token_seconds": ("histogram", (), "Mean time between output tokens after the first, per "
                                                              "finished request with two or more tokens."),
    "disagg_e2e_request_latency_seconds": ("histogram", (), "Time from arrival at the broker to the final message, "
                                                            "per finished request."),
    "disagg_kv_transfer_seconds": ("histogram", ("backend",),
                                   "KV cache transfer time per request, by transfer backend."),
    "disagg_kv_transfer_bytes": ("histogram", ("backend",), "KV cache bytes moved per request, by transfer backend."),
}

OUTCOMES = ("finished", "failed", "cancelled", "rejected")
# Label values a peer's message names are bounded to these, so junk cannot add series: worker
# and role labels come only from registered workers (at most max_workers, roles checked when a
# Ready is decoded), and an expired worker's series go with it.
ERROR_CODES = frozenset(v for k, v in vars(Code).items() if not k.startswith("_"))
BACKENDS = frozenset({"NIXL", "UCX", "MPI", "SHM", "ZMQ", "FAKE", "DEFAULT"})
ROLES = ("context", "generation", "both")
WORKER_STATES = ("idle", "busy", "full", "draining")
_KINDS = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}


class Metrics:
    """What the broker records as it runs, and the registry that exports it.

    ``gauges``: called at scrape time, returns metric name -> {label key: value} for the
    metrics that describe the present (queue depths, workers, KV blocks); ``state_gauges``
    computes them from a ``BrokerState``.
    """

    def __init__(self, gauges: Callable[[], dict] = dict) -> None:
        self.gauges = gauges
        self.outcomes = Counter()
        self.errors = Counter()
        self.expirations = Counter()
        self.migrations = 0
        self.queue = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.tpot = Histogram(TOKEN_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.kv_seconds = Histogram(TRANSFER_BUCKETS)
        self.kv_bytes = Histogram(BYTES_BUCKETS)
        self._backend_labels: dict = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def outcome(self, outcome: str, code: Optional[str] = None) -> None:
        self.outcomes.inc((("outcome", outcome),))
        if code:   # a worker's Failed names the code: one it made up is "other", not a new series
            self.errors.inc((("code", code if code in ERROR_CODES else "other"),))

    def kv_pulled(self, seconds: float, nbytes: int, backend: Optional[str]) -> None:
        """A generation worker pulled a request's KV cache over ``backend`` (a transfer backend name)."""
        label = self._backend_labels.get(backend)
        if label is None:   # once per backend name: the few there are (a worker's Ready names it)
            name = backend if backend in BACKENDS else "unknown" if not backend else "other"
            label = (("backend", name),)
            if len(self._backend_labels) < 64:   # the cache of names seen is bounded too
                self._backend_labels[backend] = label
        self.kv_seconds.observe(seconds, label)
        self.kv_bytes.observe(nbytes, label)

    def finished(self, now: float, received: float, t_first: Optional[float], tokens: int) -> None:
        """A request ended with its output (not cancelled): its latency, and its time per token
        after the first where it made two or more."""
        self.e2e.observe(now - received)
        if t_first is not None and tokens > 1:
            self.tpot.observe((now - t_first) / (tokens - 1))

    def render(self) -> str:
        """Every metric in the Prometheus text format (what ``CONTENT_TYPE_LATEST`` names)."""
        return generate_latest(self.registry).decode()

    def collect(self) -> Iterator[Metric]:
        """The prometheus_client collector protocol: one family per metric, in ``FAMILIES`` order."""
        # every outcome and role is always present, so that rate() sees a series from zero
        series = {
            "disagg_requests_total": {**{(("outcome", o),): 0 for o in OUTCOMES}, **self.outcomes.series},
            "disagg_request_errors_total": self.errors.series,
            "disagg_worker_expirations_total": {**{(("role", r),): 0 for r in ROLES}, **self.expirations.series},
            "disagg_stream_migrations_total": {(): self.migrations},
            **self.gauges(),
        }
        histograms = {
            "disagg_queue_seconds": self.queue, "disagg_time_to_first_token_seconds": self.ttft,
            "disagg_time_per_output_token_seconds": self.tpot, "disagg_e2e_request_latency_seconds": self.e2e,
            "disagg_kv_transfer_seconds": self.kv_seconds, "disagg_kv_transfer_bytes": self.kv_bytes,
        }
        for name, (kind, labels, text) in FAMILIES.items():
            fam = _KINDS[kind](name, text, labels=labels)
            if kind == "histogram":
                h = histograms[name]
                bounds = [_le(b) for b in h.buckets] + ["+Inf"]
                for key, (counts, total) in sorted(h.series.items()):
                    fam.add_metric([v for _, v in key], list(zip(bounds, accumulate(counts))), total)
            else:
                for key, value in sorted(series.get(name, {}).items()):
                    fam.add_metric([v for _, v in key], value)
            yield fam


def state_gauges(state) -> dict:
    """The gauges of a ``BrokerState`` now (requests in flight, queue depths, workers, KV blocks),
    and the counters it keeps itself (contexts skipped, prefill tokens)."""
    workers = {(("role", r), ("state", st)): 0 for r in ROLES for st in WORKER_STATES}
    used, free = {}, {}
    for w in state.workers.values():
        st = "draining" if w.draining else "full" if w.credits <= 0 else "busy" if (w.inflight or w.leases) else "idle"
        workers[(("role", w.role), ("state", st))] = workers.get((("role", w.role), ("state", st)), 0) + 1
        key = (("worker", w.worker_id), ("role", w.role))
        used[key], free[key] = w.kv_blocks - w.free_blocks, w.free_blocks
    counters = state.counters
    return {
        "disagg_context_skipped_total": {(): counters["context_skipped"]},
        "disagg_prefill_prompt_tokens_total": {(): counters["prefill_prompt_tokens"]},
        "disagg_prefill_cached_tokens_total": {(): counters["prefill_cached_tokens"]},
        "disagg_requests_in_flight": {(): len(state.requests)},
        "disagg_queue_depth": {(("queue", "prefill"),): state.prefill_queue.waiting(),
                               (("queue", "decode"),): state.decode_queue.waiting()},
        "disagg_workers": workers,
        "disagg_kv_blocks_used": used,
        "disagg_kv_blocks_free": free,
    }


def _le(bound: float) -> str:
    # the bound as the hand-written exporter spelled it ("5", "1048576", "0.005"), so that a
    # series keeps its identity across the change to prometheus_client
    return str(int(bound)) if bound.is_integer() else repr(bound)
