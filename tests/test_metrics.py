"""Metrics: the pure histogram/counter code, the Prometheus text, and what BrokerState records."""
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker import protocol as p
from broker.config import BrokerConfig
from broker.metrics import Histogram, Metrics
from broker.state import BrokerState
from tests.test_broker_state import C1, FakeClock, context_done, of, ready, submit

pytestmark = pytest.mark.timeout(30)


class Samples(dict):
    """Sample values by (name, ((label, value), ...)), looked up with the labels in any order:
    prometheus_client writes them sorted by name."""

    def __getitem__(self, key):
        return super().__getitem__(_sorted(key))

    def get(self, key, default=None):
        return super().get(_sorted(key), default)


def _sorted(key):
    return key[0], tuple(sorted(key[1]))


def parse(text: str) -> Samples:
    """Prometheus text back to its samples, through prometheus_client's own parser."""
    return Samples({(s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(text) for s in family.samples})


def test_histogram_buckets_are_cumulative_in_the_text():
    m = Metrics()
    for v in (0.001, 0.02, 0.02, 3.0, 1000.0):
        m.e2e.observe(v)
    m.e2e.observe(float("nan"))          # ignored, never poisons the sum
    s = parse(m.render())
    b = lambda le: s[("disagg_e2e_request_latency_seconds_bucket", (("le", le),))]
    assert b("0.005") == 1 and b("0.025") == 3 and b("5") == 4 and b("300") == 4 and b("+Inf") == 5
    assert s[("disagg_e2e_request_latency_seconds_count", ())] == 5
    assert s[("disagg_e2e_request_latency_seconds_sum", ())] == pytest.approx(1003.041)


def test_value_on_a_bucket_bound_counts_in_that_bucket():
    h = Histogram((1.0, 2.0))
    h.observe(1.0)
    h.observe(2.0)
    h.observe(2.5)
    assert h.series[()][0] == [1, 1, 1]


def test_text_format_has_help_type_and_escaped_labels():
    gauges = {"disagg_kv_blocks_free": {(("worker", 'we"ird\\name'), ("role", "context")): 7}}
    text = Metrics(lambda: gauges).render()
    assert text.endswith("\n")
    for name in ("disagg_requests_total", "disagg_kv_transfer_bytes", "disagg_time_per_output_token_seconds"):
        assert f"# TYPE {name} " in text and f"# HELP {name} " in text
    # prometheus_client writes labels sorted by name and every value as a float
    assert 'disagg_kv_blocks_free{role="context",worker="we\\"ird\\\\name"} 7.0' in text
    s = parse(text)
    assert s[("disagg_requests_total", (("outcome", "finished"),))] == 0   # every outcome is present


def test_each_state_exports_through_its_own_registry_never_the_global_one():
    from prometheus_client import REGISTRY
    a, b = BrokerState(BrokerConfig(), FakeClock()), BrokerState(BrokerConfig(), FakeClock())
    a.metrics.outcome("rejected", "NO_WORKERS")
    assert parse(a.metrics.render())[("disagg_requests_total", (("outcome", "rejected"),))] == 1
    assert parse(b.metrics.render())[("disagg_requests_total", (("outcome", "rejected"),))] == 0
    assert a.metrics.registry is not b.metrics.registry
    assert not [f for f in REGISTRY.collect() if f.name.startswith("disagg_")]


@pytest.fixture
def st():
    return BrokerState(BrokerConfig(max_queue=4, request_timeout_s=60, kv_lease_s=10), FakeClock())


def metrics(st):
    return parse(st.metrics.render())


def test_state_records_a_disaggregated_request(st):
    clock = st.clock
    ready(st, b"ctx", "context", blocks=100)
    ready(st, b"gen", "generation", blocks=100)
    st.on_worker(b"gen", p.Heartbeat(free_blocks=90))
    [pre] = of(submit(st), p.Prefill)
    clock.advance(0.5)
    [dec] = of(context_done(st, b"ctx", pre), p.Decode)            # first token: TTFT 0.5 s
    st.on_worker(b"gen", p.KvPulled("r1", dec.attempt, 0.003, 2 * 1024 * 1024))
    s = metrics(st)
    assert s[("disagg_workers", (("role", "generation"), ("state", "busy")))] == 1
    assert s[("disagg_workers", (("role", "context"), ("state", "idle")))] == 1
    assert s[("disagg_kv_blocks_used", (("worker", "gen"), ("role", "generation")))] == 10
    assert s[("disagg_kv_blocks_free", (("worker", "gen"), ("role", "generation")))] == 90
    assert s[("disagg_requests_in_flight", ())] == 1
    clock.advance(0.2)
    st.on_worker(b"gen", p.Tokens("r1", 1, [8, 9], "yz", dec.attempt))
    clock.advance(0.2)
    st.on_worker(b"gen", p.Finished("r1", dec.attempt, "length"))
    s = metrics(st)
    assert s[("disagg_requests_total", (("outcome", "finished"),))] == 1
    assert s[("disagg_time_to_first_token_seconds_sum", ())] == pytest.approx(0.5)
    assert s[("disagg_e2e_request_latency_seconds_sum", ())] == pytest.approx(0.9)
    # 2 tokens after the first, 0.4 s after it: 0.2 s per output token
    assert s[("disagg_time_per_output_token_seconds_sum", ())] == pytest.approx(0.2)
    zmq = (("backend", "ZMQ"),)
    assert s[("disagg_kv_transfer_seconds_count", zmq)] == 1
    assert s[("disagg_kv_transfer_seconds_sum", zmq)] == pytest.approx(0.003)
    assert s[("disagg_kv_transfer_bytes_sum", zmq)] == 2 * 1024 * 1024
    assert s[("disagg_kv_transfer_bytes_bucket", zmq + (("le", "1048576"),))] == 0
    assert s[("disagg_kv_transfer_bytes_bucket", zmq + (("le", "4194304"),))] == 1
    assert s[("disagg_requests_in_flight", ())] == 0


def test_state_records_outcomes_queue_depth_and_expiry(st):
    submit(st, "r0")                                               # no worker: rejected
    ready(st, b"both", "both", slots=1)
    [gen] = of(submit(st, "r1"), p.Generate)
    st.on_worker(b"both", p.Tokens("r1", 0, [5], "a", gen.attempt))   # streaming: no re-run from scratch
    submit(st, "r2")                                               # waits: the one slot is taken
    s = metrics(st)
    assert s[("disagg_requests_total", (("outcome", "rejected"),))] == 1
    assert s[("disagg_request_errors_total", (("code", "NO_WORKERS"),))] == 1
    assert s[("disagg_queue_depth", (("queue", "prefill"),))] == 1
    assert s[("disagg_workers", (("role", "both"), ("state", "full")))] == 1
    st.on_client(C1, p.Cancel("r2"))
    st.on_worker(b"both", p.Disconnect("bye"))                     # r1 dies with its worker
    s = metrics(st)
    assert s[("disagg_requests_total", (("outcome", "cancelled"),))] == 1
    assert s[("disagg_requests_total", (("outcome", "failed"),))] == 1
    assert s[("disagg_request_errors_total", (("code", "WORKER_DIED"),))] == 1
    assert s[("disagg_worker_expirations_total", (("role", "both"),))] == 1
    assert s[("disagg_queue_depth", (("queue", "prefill"),))] == 0


def test_ping_returns_the_text_only_when_asked(st):
    [pong] = of(st.on_client(C1, p.Ping(5)), p.Pong)
    assert "prometheus" not in pong.stats
    [pong] = of(st.on_client(C1, p.Ping(6, metrics=True)), p.Pong)
    assert "# TYPE disagg_requests_total counter" in pong.stats["prometheus"]
    # it survives the wire: the optional field is ignored by an older decoder's rules, kept by ours
    assert p.decode(p.Ping(6, metrics=True).encode()).metrics is True
