"""The embedded default model end to end: disaggregated equals aggregated, and it knows Paris."""
import pytest

from client import Client
from tests.harness import Deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

OPTS = {"kv_cache_config": {"max_tokens": 4096}, "max_num_tokens": 256, "heartbeat_ms": 1000}

PROMPTS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"prompt": "The three primary colors are"},
    {"messages": [{"role": "user", "content": "Write a haiku about the sea. " * 3}]},
]


def run(dep):
    with Client(dep.frontend, timeout=300) as c:
        return [c.generate(**kw, max_tokens=16) for kw in PROMPTS]


def test_smollm2_disaggregated_equals_aggregated_and_answers_paris():
    # liveness 5 s: a SmolLM2 prefill chunk takes well under that on 2 cores
    with Deployment(heartbeat_s=1.0, liveness=5) as d:
        d.add_worker("context", "ctx", model="smollm2-135m", options=OPTS, timeout=300)
        d.add_worker("generation", "gen", model="smollm2-135m", options=OPTS, timeout=300)
        disagg = run(d)
        d.wait_idle()
    with Deployment(heartbeat_s=1.0, liveness=5) as a:
        a.add_worker("both", "both", model="smollm2-135m", options=OPTS, timeout=300)
        agg = run(a)
    for kw, dr, ar in zip(PROMPTS, disagg, agg):
        assert dr.token_ids == ar.token_ids, f"{kw}: {dr.text!r} != {ar.text!r}"
        assert dr.text == ar.text
    assert "Paris" in disagg[0].text, disagg[0].text
    assert disagg[0].timings["kv_transfer"] > 0


def test_long_prefill_keeps_the_worker_alive_past_the_liveness_window():
    # a 512-token chunk takes 4-5 s on 2 cores; the liveness window here is 2.4 s, so only the
    # heartbeats sent between layers keep the context worker from being expired mid-prefill
    with Deployment(heartbeat_s=0.3, liveness=8) as d:
        opts = dict(OPTS, heartbeat_ms=300, max_num_tokens=512)
        d.add_worker("context", "ctx", model="smollm2-135m", options=opts, timeout=300)
        d.add_worker("generation", "gen", model="smollm2-135m", options=opts, timeout=300)
        with Client(d.frontend, timeout=300) as c:
            r = c.generate(prompt="The history of the city of Paris. " * 60, max_tokens=4, ignore_eos=True)
        assert len(r.token_ids) == 4 and r.usage["prompt_tokens"] > 400
        s = d.wait_idle()
        assert {w["worker_id"] for w in s["workers"]} == {"ctx", "gen"}
        assert s["counters"]["failed"] == 0
