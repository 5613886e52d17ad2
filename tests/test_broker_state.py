"""The broker's state machine, driven without sockets by a fake clock."""
import pytest

from broker import protocol as p
from broker.config import BrokerConfig
from broker.state import BACK, FRONT, BrokerState

C1 = b"client-1"


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def st(clock):
    return BrokerState(BrokerConfig(heartbeat_interval_s=1.0, liveness=3, max_queue=4,
                                    request_timeout_s=60, kv_lease_s=10, max_attempts=2), clock)


def ready(st, ident, role, slots=4, blocks=100):
    return st.on_worker(ident, p.Ready(ident.decode(), role, "tiny", slots, blocks,
                                       {"backend": "ZMQ", "endpoint": "tcp://x"}, 1, 1000))


def of(out, cls, socket=None, ident=None):
    return [o.msg for o in out if isinstance(o.msg, cls) and (socket is None or o.socket == socket)
            and (ident is None or o.identity == ident)]


def submit(st, rid="r1", **kw):
    return st.on_client(C1, p.Submit(request_id=rid, prompt="hello", **kw))


def context_done(st, ident, prefill, first=7, finish=None):
    return st.on_worker(ident, p.ContextDone(prefill.request_id, prefill.attempt, first, "x", [1, 2, 3],
                                             {"transfer_id": prefill.request_id}, finish, 0.01))


def pulled(st):
    """A context and a generation worker, and request r1 through its KV pull: the Decode."""
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation")
    [pre] = of(submit(st), p.Prefill)
    [dec] = of(context_done(st, b"ctx", pre), p.Decode)
    st.on_worker(b"gen", p.KvPulled("r1", dec.attempt))
    return dec


def assert_empty(st):
    assert st.requests == {} and not st.prefill_queue and not st.decode_queue
    for w in st.workers.values():
        assert w.inflight == set() and w.leases == set()


def test_disaggregated_happy_path(st):
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation")
    out = submit(st)
    assert of(out, p.Accepted, FRONT)[0].request_id == "r1"
    [pre] = of(out, p.Prefill, BACK, b"ctx")
    assert pre.sampling["seed"] is not None          # the broker fixes a seed for re-runs
    out = context_done(st, b"ctx", pre)
    [tok] = of(out, p.Tokens, FRONT)
    assert (tok.index, tok.token_ids) == (0, [7])
    [dec] = of(out, p.Decode, BACK, b"gen")
    assert dec.first_token == 7 and dec.kv_handle == {"transfer_id": "r1"} and dec.attempt > pre.attempt
    out = st.on_worker(b"gen", p.KvPulled("r1", dec.attempt, 0.002, 1000))
    # the context worker frees the blocks itself when the pull completes: no KvRelease, and the
    # broker no longer counts the lease
    assert not of(out, p.KvRelease) and not st.workers[b"ctx"].leases
    out = st.on_worker(b"gen", p.Tokens("r1", 1, [8, 9], "yz", dec.attempt))
    assert of(out, p.Tokens, FRONT)[0].token_ids == [8, 9]
    out = st.on_worker(b"gen", p.Finished("r1", dec.attempt, "length"))
    [fin] = of(out, p.Final, FRONT)
    assert fin.finish_reason == "length"
    assert fin.usage == {"prompt_tokens": 3, "completion_tokens": 3, "cached_tokens": 0}
    assert fin.timings["kv_transfer"] == 0.002 and fin.timings["ttft"] is not None
    assert not of(out, p.CancelWork)
    assert_empty(st)


def test_aggregated_when_only_both_workers(st):
    ready(st, b"w", "both")
    out = submit(st)
    [gen] = of(out, p.Generate, BACK, b"w")
    st.on_worker(b"w", p.Tokens("r1", 0, [1, 2], "ab", gen.attempt))
    out = st.on_worker(b"w", p.Finished("r1", gen.attempt, "stop", prompt_tokens=5, cached_tokens=4))
    assert of(out, p.Final)[0].usage == {"prompt_tokens": 5, "completion_tokens": 2, "cached_tokens": 4}
    assert (st.counters["prefill_prompt_tokens"], st.counters["prefill_cached_tokens"]) == (5, 4)
    assert_empty(st)


def test_last_tokens_ride_in_finished_and_final(st):
    dec = pulled(st)
    st.on_worker(b"gen", p.Tokens("r1", 1, [8], "y", dec.attempt))
    out = st.on_worker(b"gen", p.Finished("r1", dec.attempt, "length", 0, 0.0, 2, [9], "z"))
    assert not of(out, p.Tokens)                      # one message, not a Tokens and a Final
    [fin] = of(out, p.Final, FRONT)
    assert (fin.index, fin.token_ids, fin.text) == (2, [9], "z")
    assert fin.usage["completion_tokens"] == 3
    assert_empty(st)


def test_a_final_token_the_client_already_has_is_not_sent_again(st):
    ready(st, b"w", "both")
    [gen] = of(submit(st), p.Generate)
    st.on_worker(b"w", p.Tokens("r1", 0, [1, 2], "ab", gen.attempt))
    out = st.on_worker(b"w", p.Finished("r1", gen.attempt, "stop", 5, 0.0, 1, [2], "b"))
    [fin] = of(out, p.Final)
    assert fin.token_ids == [] and fin.usage["completion_tokens"] == 2
    assert_empty(st)


def test_first_token_ends_request_releases_kv(st):
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation")
    [pre] = of(submit(st), p.Prefill)
    out = context_done(st, b"ctx", pre, finish="stop")
    assert of(out, p.Final)[0].finish_reason == "stop"
    assert of(out, p.KvRelease, BACK, b"ctx") and not of(out, p.Decode)
    assert_empty(st)


def test_rejections_name_the_cause(st):
    out = submit(st)
    [err] = of(out, p.Error)
    assert err.code == p.Code.NO_WORKERS and err.retryable and "registered roles: none" in err.message
    ready(st, b"ctx", "context", slots=1)
    ready(st, b"gen", "generation")
    for i in range(5):                       # 1 dispatched + 4 queued fill the queue
        assert of(submit(st, f"q{i}"), p.Accepted)
    [err] = of(submit(st, "q5"), p.Error)
    assert err.code == p.Code.OVERLOADED and err.retryable
    [err] = of(submit(st, "q0"), p.Error)
    assert err.code == p.Code.DUPLICATE_REQUEST


def test_credits_bound_dispatch(st):
    ready(st, b"ctx", "context", slots=2)
    ready(st, b"gen", "generation")
    sent = [of(submit(st, f"r{i}"), p.Prefill) for i in range(3)]
    assert [len(s) for s in sent] == [1, 1, 0]
    out = context_done(st, b"ctx", sent[0][0])
    assert [m.request_id for m in of(out, p.Prefill)] == ["r2"]   # a slot freed: the queue moves


def test_cancel_releases_work_and_kv(st):
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation", slots=1)
    [pre] = of(submit(st), p.Prefill)
    out = st.on_client(C1, p.Cancel("r1"))
    assert of(out, p.Final)[0].finish_reason == "cancelled"
    assert of(out, p.CancelWork, BACK, b"ctx")
    assert_empty(st)
    # a ContextDone arriving after the cancel must not leak the KV
    out = context_done(st, b"ctx", pre)
    assert of(out, p.KvRelease, BACK, b"ctx") and not of(out, p.Tokens)
    # cancel during decode: work cancelled on the generation worker, KV released on the context one
    [pre] = of(submit(st, "r2"), p.Prefill)
    [dec] = of(context_done(st, b"ctx", pre), p.Decode)
    out = st.on_client(C1, p.Cancel("r2"))
    assert of(out, p.CancelWork, BACK, b"gen") and of(out, p.KvRelease, BACK, b"ctx")
    assert_empty(st)


def test_deadline(st, clock):
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation")
    submit(st, timeout_ms=500)
    clock.advance(0.4)
    assert not of(st.tick(), p.Error)
    clock.advance(0.2)
    st.on_worker(b"ctx", p.Heartbeat(100, 0))
    st.on_worker(b"gen", p.Heartbeat(100, 0))
    out = st.tick()
    [err] = of(out, p.Error, FRONT)
    assert err.code == p.Code.TIMEOUT and "deadline" in err.message
    assert of(out, p.CancelWork, BACK, b"ctx")
    assert_empty(st)


def test_context_worker_death_requeues_to_another(st, clock):
    ready(st, b"ctx1", "context")
    ready(st, b"gen", "generation")
    [pre] = of(submit(st), p.Prefill, BACK, b"ctx1")
    ready(st, b"ctx2", "context")
    clock.advance(2.0)
    st.on_worker(b"ctx2", p.Heartbeat(100, 0))
    st.on_worker(b"gen", p.Heartbeat(100, 0))
    clock.advance(1.5)                        # ctx1 silent for 3.5 s > 3 intervals
    out = st.tick()
    assert b"ctx1" not in st.workers
    [pre2] = of(out, p.Prefill, BACK, b"ctx2")
    assert pre2.attempt > pre.attempt
    # the dead worker's late answer is stale and is not relayed
    out = context_done(st, b"ctx1", pre)
    assert not of(out, p.Tokens) and of(out, p.Reconnect)


def test_context_worker_death_with_none_left_fails_clearly(st, clock):
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation")
    submit(st)
    clock.advance(2.0)
    st.on_worker(b"gen", p.Heartbeat(100, 0))
    clock.advance(1.5)
    [err] = of(st.tick(), p.Error, FRONT)
    assert err.code == p.Code.NO_WORKERS
    assert "context worker ctx" in err.message and "stopped answering" in err.message
    assert_empty(st)


def test_generation_death_before_pull_redispatches(st, clock):
    ready(st, b"ctx", "context")
    ready(st, b"gen1", "generation")
    [pre] = of(submit(st), p.Prefill)
    [dec] = of(context_done(st, b"ctx", pre), p.Decode, BACK, b"gen1")
    ready(st, b"gen2", "generation")
    out = st.on_worker(b"gen1", p.Disconnect("shutting down"))
    [dec2] = of(out, p.Decode, BACK, b"gen2")
    assert dec2.kv_handle == dec.kv_handle and not of(out, p.Error)


def test_generation_death_after_pull_fails(st):
    dec = pulled(st)
    st.on_worker(b"gen", p.Tokens("r1", 1, [5], "a", dec.attempt))
    out = st.on_worker(b"gen", p.Disconnect())
    [err] = of(out, p.Error, FRONT)
    assert err.code == p.Code.WORKER_DIED and "generation worker gen" in err.message
    assert_empty(st)


def test_context_death_during_the_pull_stops_it_and_prefills_again(st):
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation")
    [pre] = of(submit(st), p.Prefill)
    [dec] = of(context_done(st, b"ctx", pre), p.Decode, BACK, b"gen")
    ready(st, b"ctx2", "context")
    out = st.on_worker(b"ctx", p.Disconnect())
    [cw] = of(out, p.CancelWork, BACK, b"gen")
    assert cw.attempt == dec.attempt and not of(out, p.Error)
    [pre2] = of(out, p.Prefill, BACK, b"ctx2")
    out = context_done(st, b"ctx2", pre2)
    assert not of(out, p.Tokens, FRONT)               # the first token is not sent twice
    [dec2] = of(out, p.Decode, BACK, b"gen")
    assert st.workers[b"gen"].inflight == {"r1"} and dec2.attempt > dec.attempt


def test_generation_death_after_pull_migrates_the_stream_with_no_gap_or_duplicate(st):
    dec = pulled(st)
    ready(st, b"gen2", "generation")
    st.on_worker(b"gen", p.Tokens("r1", 1, [5], "a", dec.attempt))
    assert not of(st.on_worker(b"gen", p.Tokens("r1", 2, [-6], "b", dec.attempt)), p.Tokens)  # dropped
    st.on_worker(b"gen", p.Tokens("r1", 2, [6], "b", dec.attempt))
    out = st.on_worker(b"gen", p.Disconnect())
    assert not of(out, p.Error)
    [gen] = of(out, p.Generate, BACK, b"gen2")
    # the prompt as the context worker tokenised it, and every token the client has
    assert list(gen.token_ids) == [1, 2, 3] and gen.prompt is None
    assert list(gen.output_ids) == [7, 5, 6] and gen.sampling == dec.sampling
    assert gen.output_chars == len("x" "a" "b")     # the text the client has for them
    assert gen.attempt > dec.attempt and st.counters["migrated"] == 1
    assert "disagg_stream_migrations_total 1.0" in st.metrics.render()
    # tokens the client has are not sent again; the stream goes on at index 3
    out = st.on_worker(b"gen2", p.Tokens("r1", 2, [6], "b", gen.attempt))
    assert not of(out, p.Tokens, FRONT)
    out = st.on_worker(b"gen2", p.Tokens("r1", 3, [8], "c", gen.attempt))
    assert [(t.index, t.token_ids) for t in of(out, p.Tokens, FRONT)] == [(3, [8])]
    out = st.on_worker(b"gen2", p.Finished("r1", gen.attempt, "length", 3, 0.0, 4, [9], "d"))
    [fin] = of(out, p.Final, FRONT)
    assert (fin.index, fin.token_ids) == (4, [9])
    assert fin.usage == {"prompt_tokens": 3, "completion_tokens": 5, "cached_tokens": 0}
    assert_empty(st)


def test_migrations_stop_at_max_migrations_with_a_clear_error(clock):
    st = BrokerState(BrokerConfig(max_migrations=2), clock)
    dec = pulled(st)
    st.on_worker(b"gen", p.Tokens("r1", 1, [5], "a", dec.attempt))
    holder = b"gen"
    for i in range(2):
        ready(st, f"spare{i}".encode(), "generation")
        [move] = [o for o in st.on_worker(holder, p.Disconnect()) if isinstance(o.msg, p.Generate)]
        holder = move.identity
        st.on_worker(holder, p.Tokens("r1", 2 + i, [6], "b", move.msg.attempt))
    ready(st, b"spare2", "generation")
    out = st.on_worker(holder, p.Disconnect())
    [err] = of(out, p.Error, FRONT)
    assert err.code == p.Code.WORKER_DIED and "broker.max_migrations=2" in err.message
    assert "moved 2" in err.message and st.counters["migrated"] == 2
    assert_empty(st)


def test_a_both_worker_lost_mid_stream_moves_and_before_its_first_token_runs_again(st):
    ready(st, b"b1", "both")
    [g] = of(submit(st), p.Generate)
    ready(st, b"b2", "both")
    out = st.on_worker(b"b1", p.Disconnect())
    [g2] = of(out, p.Generate, BACK, b"b2")          # nothing sent yet: a plain re-run
    assert g2.output_ids is None and g2.prompt == "hello"
    st.on_worker(b"b2", p.Tokens("r1", 0, [5], "a", g2.attempt))
    ready(st, b"b3", "both")
    out = st.on_worker(b"b2", p.Disconnect())
    [g3] = of(out, p.Generate, BACK, b"b3")
    assert list(g3.output_ids) == [5] and g3.prompt == "hello"


def test_a_resumed_submit_continues_after_the_tokens_the_client_has(st):
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation")
    with pytest.raises(p.ProtocolError, match="output_chars"):
        p.Submit("r1", prompt="hello", output_ids=[5, 6])
    out = submit(st, output_ids=[5, 6], output_chars=2)
    assert of(out, p.Accepted) and not of(out, p.Prefill)
    [g] = of(out, p.Generate, BACK, b"gen")
    assert list(g.output_ids) == [5, 6] and g.output_chars == 2 and g.prompt == "hello"
    out = st.on_worker(b"gen", p.Finished("r1", g.attempt, "stop", 1, 0.0, 2, [7], "c"))
    [fin] = of(out, p.Final, FRONT)
    assert fin.index == 2 and fin.usage["completion_tokens"] == 3
    assert_empty(st)


def test_lease_expiry_prefills_again_without_duplicating_the_first_token(st, clock):
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation", slots=1)
    [busy] = of(submit(st, "busy"), p.Prefill)
    [dec_busy] = of(context_done(st, b"ctx", busy), p.Decode)   # gen's only slot is taken
    [pre] = of(submit(st), p.Prefill)
    context_done(st, b"ctx", pre)                     # r1 waits for a generation slot
    for _ in range(11):
        clock.advance(1.0)
        st.on_worker(b"ctx", p.Heartbeat(100, 1))
        st.on_worker(b"gen", p.Heartbeat(100, 0))
        out = st.tick()
        if of(out, p.Prefill):
            break
    assert of(out, p.KvRelease, BACK, b"ctx")[0].request_id == "r1"
    [pre2] = of(out, p.Prefill)
    out = context_done(st, b"ctx", pre2)
    assert not of(out, p.Tokens)        # index 0 was already sent


def test_retryable_pull_failure_prefills_again(st):
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation")
    [pre] = of(submit(st), p.Prefill)
    [dec] = of(context_done(st, b"ctx", pre), p.Decode)
    out = st.on_worker(b"gen", p.Failed("r1", dec.attempt, p.Code.KV_TRANSFER_FAILED, "peer gone", True))
    assert of(out, p.KvRelease, BACK, b"ctx") and of(out, p.Prefill, BACK, b"ctx")
    # a non-retryable failure (a timeout) ends the request with the worker's message
    [pre2] = of(out, p.Prefill)
    [dec2] = of(context_done(st, b"ctx", pre2), p.Decode)
    out = st.on_worker(b"gen", p.Failed("r1", dec2.attempt, p.Code.KV_TRANSFER_TIMEOUT,
                                        "KV transfer timed out after 100 ms", False))
    [err] = of(out, p.Error, FRONT)
    assert err.code == p.Code.KV_TRANSFER_TIMEOUT and "timed out" in err.message
    assert of(out, p.KvRelease, BACK, b"ctx")
    assert_empty(st)


def test_out_of_order_tokens_are_never_relayed(st):
    ready(st, b"w", "both")
    [gen] = of(submit(st), p.Generate)
    assert of(st.on_worker(b"w", p.Tokens("r1", 0, [1], "a", gen.attempt)), p.Tokens)
    assert not of(st.on_worker(b"w", p.Tokens("r1", 0, [1], "a", gen.attempt)), p.Tokens)  # duplicate
    assert not of(st.on_worker(b"w", p.Tokens("r1", 5, [1], "a", gen.attempt)), p.Tokens)  # gap
    assert not of(st.on_worker(b"w", p.Tokens("r1", 1, [1], "a", gen.attempt - 1)), p.Tokens)  # stale


def test_client_gone_cancels_its_requests(st):
    ready(st, b"w", "both")
    submit(st)
    out = st.client_gone(C1)
    assert of(out, p.CancelWork, BACK, b"w") and not of(out, p.Final)
    assert_empty(st)


def test_heartbeats_and_timer(st, clock):
    ready(st, b"w", "both")
    out = st.tick()
    assert of(out, p.BrokerHeartbeat, BACK, b"w")
    assert not of(st.tick(), p.BrokerHeartbeat)
    assert 0 < st.next_timer() <= 1.0
    clock.advance(1.0)
    assert of(st.tick(), p.BrokerHeartbeat)


def test_unknown_worker_is_told_to_reconnect(st):
    out = st.on_worker(b"ghost", p.Heartbeat())
    assert of(out, p.Reconnect)


def test_stats(st):
    ready(st, b"w", "both")
    submit(st)
    s = st.stats()
    assert s["requests"] == 1 and s["workers"][0]["inflight"] == 1


def test_dispatch_prefers_workers_with_free_blocks(st):
    ready(st, b"full", "context", slots=8)
    ready(st, b"roomy", "context", slots=2)
    ready(st, b"gen", "generation")
    st.on_worker(b"full", p.Heartbeat(0, 5))     # every block held by leases
    assert of(submit(st), p.Prefill, BACK, b"roomy")


def test_prompt_token_ids_pass_through_as_they_came(st):
    # the broker never unpacks a prompt: its cost per request does not grow with the prompt
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation")
    sub = p.Submit("r1", token_ids=list(range(1000)))
    [pre] = of(st.on_client(C1, sub), p.Prefill, BACK, b"ctx")
    assert pre.token_ids is sub.token_ids
    done = p.ContextDone("r1", pre.attempt, 7, "x", pre.token_ids, {"k": 1}, None, 0.01)
    [dec] = of(st.on_worker(b"ctx", done), p.Decode, BACK, b"gen")
    assert dec.prompt_token_ids is done.prompt_token_ids and dec.prompt_token_ids == list(range(1000))
    assert st.requests["r1"].prompt_tokens == 1000


# ---------------------------------------------------------------------------------------------
# bounded state per peer (issue 13): workers, metric series

def test_workers_past_max_workers_are_refused_and_metric_series_stay_bounded(clock):
    from broker.metrics import Metrics
    s = BrokerState(BrokerConfig(heartbeat_interval_s=1.0, liveness=3, max_workers=3), clock)
    for i in range(10):
        ready(s, f"w{i}".encode(), "context")
    assert sorted(w.worker_id for w in s.workers.values()) == ["w0", "w1", "w2"]
    # workers coming and going under new ids, as junk Readys would: series of live workers only
    for i in range(200):
        s.on_worker(b"w0", p.Ready(f"junk-{i}", ("context", "generation", "both")[i % 3], "m", 1, 10))
        s.on_worker(b"w0", p.Failed("nope", 1, f"MADE_UP_{i}", "x"))
    text = s.metrics.render()
    assert "junk-199" in text and "junk-198" not in text, "an expired worker's series stayed"
    assert "MADE_UP" not in text
    s.metrics.outcome("failed", "MADE_UP_CODE")
    s.metrics.kv_pulled(0.1, 100, "NOT_A_BACKEND")
    s.metrics.kv_pulled(0.1, 100, "ZMQ")
    text = s.metrics.render()
    assert 'code="other"' in text and 'backend="other"' in text and 'backend="ZMQ"' in text
    clock.t += 10                      # every worker expires: their series go with them
    s.tick()
    assert "junk-199" not in s.metrics.render() and not s.workers
    assert isinstance(Metrics().render(), str)


def test_rate_limited_log_counts_what_it_drops(caplog):
    import logging

    from broker.ratelog import RateLimitedLog
    t = [0.0]
    rl = RateLimitedLog(logging.getLogger("test.ratelog"), "bad things", period=10, burst=2,
                        clock=lambda: t[0])
    with caplog.at_level(logging.WARNING, "test.ratelog"):
        logged = [rl(logging.WARNING, "bad %d", i) for i in range(100)]
        t[0] = 11
        rl(logging.WARNING, "bad again")
    assert logged.count(True) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bad 0", "bad 1", "98 more bad things in the last 11 s (not logged one by one)", "bad again"]


# ---------------------------------------------------------------------------------------------
# draining workers and minimal_instances

def test_a_draining_worker_gets_no_new_work_and_keeps_what_it_holds(st):
    ready(st, b"ctx1", "context")
    ready(st, b"gen", "generation")
    [pre] = of(submit(st, "r1"), p.Prefill, BACK, b"ctx1")
    out = st.on_worker(b"ctx1", p.Heartbeat(90, 0, 0, draining=True))
    assert of(out, p.Drain, BACK, b"ctx1")             # told: nothing more after this
    assert st.workers[b"ctx1"].draining and st.workers[b"ctx1"].credits == 0
    assert st.stats()["workers"][0]["draining"] is True
    assert not of(submit(st, "r2"), p.Prefill)        # queued: the only context worker is leaving
    out = ready(st, b"ctx2", "context")               # a new one takes it as soon as it registers
    assert [m.request_id for m in of(out, p.Prefill, BACK, b"ctx2")] == ["r2"]
    # what ctx1 holds goes on as usual: its prefill, then the KV pull from it
    [dec] = of(context_done(st, b"ctx1", pre), p.Decode, BACK, b"gen")
    st.on_worker(b"gen", p.KvPulled("r1", dec.attempt))
    st.on_worker(b"gen", p.Finished("r1", dec.attempt, p.Finish.LENGTH, 3))
    assert b"ctx1" in st.workers and not st.workers[b"ctx1"].inflight and not st.workers[b"ctx1"].leases
    out = st.on_worker(b"ctx1", p.Disconnect("drained"))
    assert b"ctx1" not in st.workers and not of(out, p.Error)
    gauges = st.metrics.render()
    assert 'disagg_workers{role="context",state="draining"} 0.0' in gauges


def test_drain_worker_by_id_from_a_client(st):
    ready(st, b"a", "generation")
    out = st.on_client(C1, p.DrainWorker("a", 5))
    [pong] = of(out, p.Pong, FRONT, C1)
    assert pong.nonce == 5 and pong.stats == {"worker_id": "a", "draining": 1}
    assert of(out, p.Drain, BACK, b"a") and st.workers[b"a"].draining
    [pong] = of(st.on_client(C1, p.DrainWorker("nobody", 6)), p.Pong)
    assert pong.stats["draining"] == 0
    assert 'state="draining"} 1.0' in st.metrics.render()


def test_minimal_instances_gate_admission(st):
    st.pool.minimum = {"context": 2, "generation": 1}
    ready(st, b"ctx1", "context")
    ready(st, b"gen", "generation")
    [err] = of(submit(st), p.Error, FRONT)
    assert err.code == p.Code.NO_WORKERS and err.retryable
    assert "minimal_instances" in err.message and "context workers up 1, need 2" in err.message
    ready(st, b"ctx2", "context")
    assert of(submit(st, "r2"), p.Accepted)
    st.on_worker(b"ctx2", p.Heartbeat(100, 0, 0, draining=True))     # a draining one does not count
    [err] = of(submit(st, "r3"), p.Error, FRONT)
    assert err.code == p.Code.NO_WORKERS and "context workers up 1, need 2" in err.message
    ready(st, b"both", "both")                                       # counts for either role
    assert of(submit(st, "r4"), p.Accepted)
