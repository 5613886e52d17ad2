"""The Triton TensorRT-LLM backend's ``nv_trt_llm_*`` metric families, filled from the broker's
stats, for dashboards and routers (the Gateway API inference extension, llm-d) built for Triton.

The families, their category label and its values are the backend's (its custom metrics
reporter): every series has the labels ``model``, ``version`` and the family's category label.
``model`` is the worker role, as the disaggregated BLS names its two ``tensorrt_llm`` models:
``context`` and ``generation`` (``tensorrt_llm`` for ``both`` workers), each summed over the
workers of that role. Values the broker does not know (runtime memory, tokens per block, reused
blocks, context tokens, the iteration counter) are left out rather than made up.

Pure: ``render`` takes the stats, the broker's own Prometheus text and the time.
"""
from __future__ import annotations

from typing import Iterable

from prometheus_client.parser import text_string_to_metric_families

MODEL_OF_ROLE = {"context": "context", "generation": "generation", "both": "tensorrt_llm"}
# family -> (type, category label, help): the backend's own names and help texts
FAMILIES = {
    "nv_trt_llm_request_metrics": ("gauge", "request_type", "TRT LLM request metrics"),
    "nv_trt_llm_kv_cache_block_metrics": ("gauge", "kv_cache_block_type", "TRT LLM KV cache block metrics"),
    "nv_trt_llm_inflight_batcher_metrics": ("gauge", "inflight_batcher_specific_metric",
                                            "TRT LLM inflight_batcher-specific metrics"),
    "nv_trt_llm_general_metrics": ("gauge", "general_type", "General TRT LLM metrics"),
    "nv_trt_llm_disaggregated_serving_metrics": ("counter", "disaggregated_serving_type",
                                                 "TRT LLM disaggregated serving metrics"),
}


def _kv_transfers(prometheus: str) -> tuple[float, float]:
    """(KV transfer milliseconds, transfers) so far, from the broker's ``disagg_kv_transfer_seconds``."""
    ms = count = 0.0
    for fam in text_string_to_metric_families(prometheus):
        if fam.name == "disagg_kv_transfer_seconds":
            for s in fam.samples:
                if s.name.endswith("_sum"):
                    ms += s.value * 1000.0
                elif s.name.endswith("_count"):
                    count += s.value
    return ms, count


def series(stats: dict, prometheus: str, now: float) -> dict:
    """family -> [(model, category value, value)]."""
    out: dict = {name: [] for name in FAMILIES}
    groups: dict = {}
    for w in stats.get("workers", []):
        groups.setdefault(MODEL_OF_ROLE.get(w.get("role"), "tensorrt_llm"), []).append(w)
    waiting = {"context": stats.get("queued", 0), "generation": stats.get("waiting_decode", 0),
               "tensorrt_llm": stats.get("queued", 0)}
    for model, ws in sorted(groups.items()):
        active = sum(w["inflight"] for w in ws)
        blocks, free = sum(w["kv_blocks"] for w in ws), sum(w["free_blocks"] for w in ws)
        out["nv_trt_llm_request_metrics"] += [
            (model, "active", active), (model, "max", sum(w["slots"] for w in ws)),
            (model, "scheduled", active), (model, "context", active if model != "generation" else 0),
            (model, "waiting", waiting[model])]
        out["nv_trt_llm_kv_cache_block_metrics"] += [
            (model, "max", blocks), (model, "free", free), (model, "used", blocks - free),
            (model, "fraction", (blocks - free) / blocks if blocks else 0.0)]
        out["nv_trt_llm_inflight_batcher_metrics"] += [
            (model, "generation_requests", active if model != "context" else 0),
            (model, "micro_batch_id", 0), (model, "paused_requests", 0)]   # no pipeline stages, no preemption
        out["nv_trt_llm_general_metrics"].append((model, "timestamp", int(now * 1e6)))   # microseconds
    ms, count = _kv_transfers(prometheus)
    out["nv_trt_llm_disaggregated_serving_metrics"] += [("generation", "kv_cache_transfer_ms", ms),
                                                        ("generation", "request_count", int(count))]
    return out


def _lines(name: str, kind: str, label: str, help_: str, rows: Iterable) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    for model, category, value in rows:
        shown = str(value) if isinstance(value, int) else repr(float(value))
        lines.append(f'{name}{{{label}="{category}",model="{model}",version="1"}} {shown}')
    return lines


def render(stats: dict, prometheus: str, now: float) -> str:
    """The families in the Prometheus text format, as Triton writes them (a counter without ``_total``)."""
    rows = series(stats, prometheus, now)
    lines: list[str] = []
    for name, (kind, label, help_) in FAMILIES.items():
        lines += _lines(name, kind, label, help_, rows[name])
    return "\n".join(lines) + "\n"
