"""Many models behind one broker, on the state machine with a fake clock: every phase of a
request runs on workers of its model, the default-model rule, unknown models, and no
head-of-line blocking across models."""
import pytest

from broker import protocol as p
from broker.config import BrokerConfig
from broker.state import BrokerState
from tests.test_broker_state import C1, FakeClock, assert_empty, context_done, of


def ready(st, ident, role, model, slots=1):
    return st.on_worker(ident, p.Ready(ident.decode(), role, model, slots, 100,
                                       {"backend": "ZMQ", "endpoint": "tcp://x"}, 1, 1000))


def submit(st, rid, model=None):
    return st.on_client(C1, p.Submit(request_id=rid, prompt="hello", model=model))


def make(**cfg):
    return BrokerState(BrokerConfig(max_queue=100, **cfg), FakeClock())


def two_models(st):
    """Model a: a context and a generation worker; model b: one `both` worker."""
    ready(st, b"ctx-a", "context", "a")
    ready(st, b"gen-a", "generation", "a")
    ready(st, b"both-b", "both", "b")


def test_each_phase_runs_on_workers_of_the_named_model():
    st = make()
    ready(st, b"ctx-b", "context", "b")      # b is disaggregated too here: KV must not cross models
    ready(st, b"gen-b", "generation", "b")
    ready(st, b"ctx-a", "context", "a")
    ready(st, b"gen-a", "generation", "a")
    pa = [o for o in submit(st, "ra", "a") if isinstance(o.msg, p.Prefill)]
    pb = [o for o in submit(st, "rb", "b") if isinstance(o.msg, p.Prefill)]
    assert [o.identity for o in pa] == [b"ctx-a"] and [o.identity for o in pb] == [b"ctx-b"]
    da = [o for o in context_done(st, b"ctx-a", pa[0].msg) if isinstance(o.msg, p.Decode)]
    db = [o for o in context_done(st, b"ctx-b", pb[0].msg) if isinstance(o.msg, p.Decode)]
    assert [o.identity for o in da] == [b"gen-a"] and [o.identity for o in db] == [b"gen-b"]


def test_a_named_model_with_only_a_busy_generation_worker_waits_for_its_own():
    st = make()
    two_models(st)
    [pre] = of(submit(st, "r1", "a"), p.Prefill)
    ready(st, b"gen-b", "generation", "b")           # free, but of the other model
    st.on_worker(b"gen-a", p.Heartbeat())
    st.workers[b"gen-a"].inflight.add("busy")        # model a's generation worker is full
    out = context_done(st, b"ctx-a", pre)
    assert of(out, p.Decode) == [] and st.decode_queue.waiting() == 1
    st.workers[b"gen-a"].inflight.discard("busy")
    out = st.on_worker(b"gen-a", p.Heartbeat())
    assert [o.identity for o in out if isinstance(o.msg, p.Decode)] == [b"gen-a"]


def test_no_model_named_goes_to_the_only_model_or_the_first_registered():
    st = make()
    ready(st, b"both-b", "both", "b")
    assert [o.identity for o in submit(st, "r1") if isinstance(o.msg, p.Generate)] == [b"both-b"]
    ready(st, b"both-a", "both", "a")
    assert [o.identity for o in submit(st, "r2") if isinstance(o.msg, p.Generate)] == []   # b is busy
    assert st.requests[st.ids.key(C1, "r2")].model == "b"


def test_no_model_named_goes_to_the_configured_default():
    st = make(default_model="a")
    two_models(st)
    assert [o.identity for o in submit(st, "r1") if isinstance(o.msg, p.Prefill)] == [b"ctx-a"]
    st = make(default_model="c")     # not up: the first registered
    ready(st, b"both-b", "both", "b")
    ready(st, b"both-a", "both", "a")
    assert [o.identity for o in submit(st, "r1") if isinstance(o.msg, p.Generate)] == [b"both-b"]


def test_an_unknown_model_is_refused_naming_the_available_ones():
    st = make()
    two_models(st)
    [err] = of(submit(st, "r1", "nope"), p.Error)
    assert err.code == p.Code.UNKNOWN_MODEL and not err.retryable
    assert "'nope'" in err.message and "available models: a, b" in err.message
    assert st.counters["rejected"] == 1 and st.requests == {}


def test_a_model_without_a_full_set_of_roles_is_refused_as_retryable():
    st = make()
    ready(st, b"ctx-a", "context", "a")
    ready(st, b"both-b", "both", "b")
    [err] = of(submit(st, "r1", "a"), p.Error)
    assert err.code == p.Code.NO_WORKERS and err.retryable and "model 'a'" in err.message


def test_one_models_full_queue_does_not_block_another_models_requests():
    st = make()
    two_models(st)
    for i in range(10):                      # one slot each: r-a0 runs, nine wait
        submit(st, f"a{i}", "a")
    assert st.prefill_queue.waiting() == 9
    out = submit(st, "b0", "b")
    assert [o.identity for o in out if isinstance(o.msg, p.Generate)] == [b"both-b"]
    # model a's queue drains in arrival order as its context worker frees up
    first = st.requests[st.ids.key(C1, "a0")]
    st.on_worker(b"ctx-a", p.Failed(first.request_id, first.attempt, p.Code.INTERNAL, "boom", False))
    nxt = st.requests[st.ids.key(C1, "a1")]
    assert nxt.worker == b"ctx-a" and st.prefill_queue.waiting() == 8


def test_queued_requests_of_a_model_whose_workers_left_fail_alone():
    st = make()
    two_models(st)
    submit(st, "a0", "a")
    submit(st, "a1", "a")      # waits for ctx-a
    submit(st, "b0", "b")
    submit(st, "b1", "b")      # waits for both-b
    out = st.on_worker(b"ctx-a", p.Disconnect("bye"))
    errs = of(out, p.Error)
    assert {e.request_id for e in errs} == {"a0", "a1"} and {e.code for e in errs} == {p.Code.NO_WORKERS}
    assert {r.client_rid for r in st.requests.values()} == {"b0", "b1"}


@pytest.mark.parametrize("name", ["", "x" * 257])
def test_submit_model_is_bounded(name):
    with pytest.raises(p.ProtocolError, match="model"):
        p.decode(p.Submit(request_id="r", prompt="x", model=name).encode())


def test_everything_ends_clean_with_two_models():
    st = make()
    two_models(st)
    submit(st, "a0", "a")
    submit(st, "b0", "b")
    for r in list(st.requests.values()):
        st.on_client(C1, p.Cancel(r.client_rid))
    assert_empty(st)
