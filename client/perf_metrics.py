"""TensorRT-LLM's ``GET /perf_metrics``: per-request context and generation timing, KV transfer
time and size, for the benchmark scripts that read it from a disaggregated server.

The gateway keeps the metrics of its most recent finished requests in a bounded ring; a read
returns them and drains them, as TensorRT-LLM's disaggregated server does (each request is
reported once; when the ring is full the oldest are dropped unread). An entry has TensorRT-LLM's
shape: ``disagg_server_arrival_time``, ``disagg_server_first_token_time``, ``ctx_perf_metrics``
and ``gen_perf_metrics``, each of those with ``request_id``, ``ctx_request_id`` and
``perf_metrics.timing_metrics`` (``arrival_time``, ``first_scheduled_time``, ``first_token_time``,
``last_token_time``; the generation side's ``kv_cache_transfer_start``, ``kv_cache_transfer_end``
and ``kv_cache_size`` in bytes when the KV moved). The times are seconds on the gateway's steady
clock (``time.monotonic``): the broker reports durations (queue, prefill, KV transfer, time to
first token, total; ``Final.timings``), placed here from the moment the gateway submitted the
request. ``timings`` holds those durations as the broker gave them.

Pure: no I/O.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

DEFAULT_MAX_REQUESTS = 1000


class PerfMetrics:
    """The ring of recent requests' metrics (``max_requests`` of them at most; 0 keeps none)."""

    def __init__(self, max_requests: int = DEFAULT_MAX_REQUESTS):
        if isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 0:
            raise ValueError(f"invalid perf_metrics_max_requests={max_requests!r}: expected an integer >= 0")
        self.ring: deque = deque(maxlen=max_requests)

    def add(self, request_id: str, arrival: float, submitted: float, timings: dict) -> None:
        """A finished request: ``arrival`` when its HTTP request came, ``submitted`` when it went
        to the broker (both ``time.monotonic()``), ``timings`` its ``Completion.timings``."""
        if self.ring.maxlen:
            self.ring.append(entry(request_id, arrival, submitted, timings))

    def drain(self) -> list[dict]:
        out = list(self.ring)
        self.ring.clear()
        return out


def _seconds(timings: dict, key: str) -> float:
    v = timings.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def entry(request_id: str, arrival: float, submitted: float, timings: dict) -> dict:
    queue, prefill = _seconds(timings, "queue"), _seconds(timings, "prefill")
    kv_s, total = _seconds(timings, "kv_transfer"), _seconds(timings, "total")
    kv_bytes = int(_seconds(timings, "kv_bytes"))
    scheduled = submitted + queue
    ctx_first = scheduled + prefill                    # the context phase's token
    ttft: Optional[float] = timings.get("ttft")
    first = submitted + float(ttft) if isinstance(ttft, (int, float)) else ctx_first
    last = submitted + total
    ctx = {"arrival_time": submitted, "first_scheduled_time": scheduled, "first_token_time": ctx_first,
           "server_arrival_time": submitted, "server_first_token_time": first, "last_token_time": ctx_first}
    gen = {"arrival_time": ctx_first, "server_arrival_time": ctx_first, "last_token_time": last}
    if kv_bytes or kv_s:    # disaggregated: the generation worker pulled the KV, then decoded
        gen.update(kv_cache_size=kv_bytes, kv_cache_transfer_start=ctx_first,
                   kv_cache_transfer_end=ctx_first + kv_s, first_scheduled_time=ctx_first + kv_s)
    else:                   # one worker ran both phases
        gen["first_scheduled_time"] = ctx_first

    def side(timing: dict) -> dict:
        return {"request_id": request_id, "ctx_request_id": request_id,
                "perf_metrics": {"timing_metrics": timing}}

    return {"request_id": request_id, "ctx_server": "", "gen_server": "",
            "disagg_server_arrival_time": arrival, "disagg_server_first_token_time": first,
            "ctx_perf_metrics": side(ctx), "gen_perf_metrics": side(gen),
            "timings": {k: timings.get(k) for k in ("queue", "prefill", "kv_transfer", "ttft", "total",
                                                     "kv_bytes")}}
