"""The worker's scheduler on its own: a fake clock, the real block allocator, the byte tokenizer
and a scripted stand-in for the model. No process, socket, torch or transfer backend."""
import itertools

import pytest

from broker import protocol as p
from broker.protocol import Code
from workers.engine.block_allocator import BlockAllocator
from workers.engine.tokenizer import ByteTokenizer
from workers.scheduler import Scheduler

TOK = ByteTokenizer()
EOS = TOK.EOS
BLOCK = 4


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Rig:
    """A scheduler with what the worker would give it, recording the transfer calls it makes."""

    def __init__(self, role="both", blocks=8, max_num_tokens=512, max_batch_size=64, max_seq_len=1000,
                 alloc=None):
        self.clock = Clock()
        self.alloc = alloc or BlockAllocator(blocks)
        self.calls = []
        self.sched = Scheduler(role, "w1", self.alloc, BLOCK, TOK, TOK.vocab_size, max_seq_len,
                               max_batch_size, max_num_tokens, heartbeat_ms=1000,
                               broker_timeout_ms=5000, clock=self.clock, register=self._register,
                               release=lambda key: self.calls.append(("release", key)),
                               cancel_pull=lambda key: self.calls.append(("cancel", key)))
        self.script = {}      # request id -> the tokens the "model" samples for it, in order
        self.steps = []       # what each engine step ran

    def _register(self, key, blocks, num_tokens):
        self.calls.append(("register", key, list(blocks), num_tokens))
        return {"key": key}

    def send(self, *msgs):
        for m in msgs:
            self.sched.on_message(m)

    def take(self, kind=None):
        out, self.sched.outbox = self.sched.outbox, []
        return [m for m in out if kind is None or isinstance(m, kind)]

    def step(self):
        """What the worker loop does in one step, with the model replaced by ``script``."""
        s = self.sched
        for pull in s.admit():
            self.steps.append(("pull", pull.seq.request_id, list(pull.blocks)))
        chunk = s.next_prefill()
        if chunk is not None:
            self.steps.append(("prefill", chunk.seq.request_id, chunk.start, chunk.end))
            s.prefilled(chunk)
            if chunk.samples:
                s.first_token(chunk.seq, next(self.script[chunk.seq.request_id]))
        batch = s.next_decode()
        if batch is not None:
            self.steps.append(("decode", [q.request_id for q in batch.seqs]))
            s.decoded(batch, [next(self.script[q.request_id]) for q in batch.seqs])

    def run_until_idle(self, limit=100):
        for _ in range(limit):
            if not (self.sched.waiting or self.sched.prefilling or self.sched.running):
                return
            self.step()
        raise AssertionError("the scheduler never went idle")

    def assert_clean(self):
        s = self.sched
        assert self.alloc.num_free == self.alloc.num_blocks
        assert not (s.seqs or s.waiting or s.prefilling or s.pulling or s.running or s.leases)


def generate(rid, prompt, attempt=1, **sampling):
    return p.Generate(request_id=rid, attempt=attempt, prompt=prompt, sampling=sampling)


def prefill(rid, prompt, attempt=1, lease_ms=1000, **sampling):
    return p.Prefill(request_id=rid, attempt=attempt, prompt=prompt, sampling=sampling, lease_ms=lease_ms)


def decode(rid, prompt_ids, attempt=1, first_token=97, **sampling):
    return p.Decode(request_id=rid, attempt=attempt, prompt_token_ids=prompt_ids,
                    first_token=first_token, first_text=chr(first_token),
                    kv_handle={"key": f"{rid}#{attempt}"}, sampling=sampling)


def text_of(msgs, rid):
    return "".join(m.text for m in msgs if isinstance(m, (p.Tokens, p.Finished)) and m.request_id == rid)


# ---------------------------------------------------------------------------------------------


def test_whole_request_streams_tokens_in_order_and_finishes_on_eos():
    r = Rig()
    r.script["a"] = iter([ord("h"), ord("i"), EOS])
    r.send(generate("a", "abc", max_tokens=10))
    r.run_until_idle()
    msgs = r.take()
    toks = [m for m in msgs if isinstance(m, p.Tokens)]
    assert [(t.index, list(t.token_ids), t.text) for t in toks] == [(0, [104], "h"), (1, [105], "i")]
    fin = msgs[-1]
    assert isinstance(fin, p.Finished) and fin.finish_reason == "stop"
    assert (fin.index, list(fin.token_ids), fin.prompt_tokens) == (2, [EOS], 3)   # 3 tokens in all
    r.assert_clean()


def test_length_stop_and_max_tokens_clipped_to_the_cache():
    r = Rig(blocks=2)                          # 8 tokens of KV
    r.script["a"] = itertools.cycle(b"x")
    r.send(generate("a", "abc", max_tokens=100))
    assert r.sched.seqs["a"].max_new == 5      # the cache, not max_tokens, is the limit
    r.run_until_idle()
    fin = r.take(p.Finished)[0]
    assert fin.finish_reason == "length" and fin.index + len(fin.token_ids) == 5
    r.assert_clean()


def test_fifo_admission_waits_for_blocks_and_admits_in_order_when_freed():
    r = Rig(blocks=4)                          # 16 tokens
    r.script = {k: itertools.cycle(b"z") for k in "abc"}
    r.send(generate("a", "aaaa", max_tokens=8),    # 12 tokens: 3 blocks
           generate("b", "bbbb", max_tokens=4),    # 8 tokens: 2 blocks, only 1 free: waits
           generate("c", "c", max_tokens=1))       # 1 block would fit, but FIFO keeps it behind b
    r.step()
    assert [s.request_id for s in r.sched.waiting] == ["b", "c"]
    assert r.alloc.num_free == 1
    assert r.sched.heartbeat_if_due()
    hb = r.take(p.Heartbeat)[0]
    assert len(r.sched.seqs) == 3 and hb.free_blocks == 1
    r.run_until_idle()
    prefills = [s[1] for s in r.steps if s[0] == "prefill"]
    assert prefills == ["a", "b", "c"]
    assert {m.request_id for m in r.take(p.Finished)} == {"a", "b", "c"}
    r.assert_clean()


def test_long_prompt_prefills_in_chunks_with_decode_steps_between():
    r = Rig(blocks=16, max_num_tokens=4)
    r.script = {"short": itertools.cycle(b"s"), "long": itertools.cycle(b"l")}
    r.send(generate("short", "ab", max_tokens=6))
    r.step()                                   # short prefilled, first token out
    r.send(generate("long", "0123456789", max_tokens=2))
    for _ in range(3):
        r.step()
    assert r.steps == [("prefill", "short", 0, 2), ("decode", ["short"]),
                       ("prefill", "long", 0, 4), ("decode", ["short"]),
                       ("prefill", "long", 4, 8), ("decode", ["short"]),
                       ("prefill", "long", 8, 10), ("decode", ["short", "long"])]
    r.run_until_idle()
    assert text_of(r.take(), "long") == "ll"
    r.assert_clean()


def test_decode_batch_is_capped_at_max_batch_size_oldest_first():
    r = Rig(blocks=32, max_batch_size=2)
    r.script = {k: itertools.cycle(b"q") for k in "abc"}
    r.send(*(generate(k, k, max_tokens=5) for k in "abc"))
    for _ in range(3):
        r.step()
    decodes = [s[1] for s in r.steps if s[0] == "decode"]
    assert decodes == [["a"], ["a", "b"], ["a", "b"]]     # c runs, but waits for a seat
    r.sched.heartbeat_if_due()
    assert r.take(p.Heartbeat)[0].max_decode_batch == 2
    r.run_until_idle()
    r.assert_clean()


def test_cancel_frees_blocks_in_every_state_and_ignores_other_attempts():
    r = Rig(blocks=4, max_num_tokens=2)
    r.script = {k: itertools.cycle(b"y") for k in "abc"}
    r.send(generate("a", "aa", max_tokens=6),      # 2 blocks, runs
           generate("b", "bbbb", max_tokens=1),    # 2 blocks, chunked prefill
           generate("c", "c", max_tokens=20))      # waits for blocks
    r.step()
    r.step()
    assert r.sched.running and r.sched.prefilling and r.sched.waiting
    r.send(p.CancelWork(request_id="a", attempt=2))   # not the attempt that runs here
    assert "a" in r.sched.seqs
    for rid in "abc":
        r.send(p.CancelWork(request_id=rid, attempt=1))
    r.take()
    r.step()
    assert r.take() == []                      # nothing more for a cancelled request
    r.assert_clean()


def test_newer_dispatch_replaces_the_older_attempt():
    r = Rig(blocks=8)
    r.script = {"a": itertools.cycle(b"n")}
    r.send(generate("a", "old prompt", max_tokens=3))
    r.step()
    r.send(generate("a", "new", attempt=2, max_tokens=3))
    assert r.sched.seqs["a"].attempt == 2 and not r.sched.running
    r.run_until_idle()
    fins = r.take(p.Finished)
    assert [(f.request_id, f.attempt) for f in fins] == [("a", 2)]
    r.assert_clean()


def test_context_worker_holds_a_lease_until_release_or_expiry():
    r = Rig(role="context", blocks=8)
    r.script = {"a": iter(b"A"), "b": iter(b"B"), "c": iter([EOS])}
    r.send(prefill("a", "hello", lease_ms=1000), prefill("b", "world", lease_ms=1000),
           prefill("c", "bye", lease_ms=1000))
    r.run_until_idle()
    done = {m.request_id: m for m in r.take(p.ContextDone)}
    assert done["a"].first_token == ord("A") and done["a"].kv_handle == {"key": "a#1"}
    assert list(done["a"].prompt_token_ids) == list(b"hello") and done["a"].finish_reason is None
    assert done["c"].finish_reason == "stop" and done["c"].kv_handle == {}   # nothing to pull
    assert ("register", "a#1", [0, 1], 5) in r.calls and set(r.sched.leases) == {"a#1", "b#1"}
    assert r.alloc.num_free == 8 - 4 and not r.sched.seqs
    r.send(p.KvRelease(request_id="a", attempt=1))
    assert ("release", "a#1") in r.calls and set(r.sched.leases) == {"b#1"}
    r.clock.t += 2 * 1000 / 1000 + 5 - 0.01     # the lease TTL: 2 * lease_ms + 5 s
    r.sched.expire_leases()
    assert set(r.sched.leases) == {"b#1"}
    r.clock.t += 0.02
    r.sched.expire_leases()
    assert r.calls[-1] == ("release", "b#1")
    r.assert_clean()


def test_generation_worker_pulls_then_decodes_and_a_failed_pull_frees_its_blocks():
    r = Rig(role="generation", blocks=4)
    r.script = {"a": itertools.cycle(b"g")}
    r.send(decode("a", list(b"abcde"), max_tokens=3),   # 5 + 3 tokens: 2 blocks, prompt in both
           decode("b", list(b"xy"), max_tokens=2))       # 1 block
    pulls = list(r.sched.admit())
    assert [(q.seq.request_id, q.blocks) for q in pulls] == [("a", [0, 1]), ("b", [2])]
    r.sched.pull_done("a#1", 0.01, 1234)
    r.sched.pull_failed("b#1", Code.KV_TRANSFER_FAILED, "peer gone", retryable=True)
    r.sched.pull_done("b#1", 0.01, 1)            # a late result for a dropped pull changes nothing
    msgs = r.take()
    assert isinstance(msgs[0], p.KvPulled) and msgs[0].nbytes == 1234
    assert isinstance(msgs[1], p.Failed) and msgs[1].retryable and msgs[1].message == "peer gone"
    assert ("cancel", "b#1") not in r.calls      # a finished pull needs no cancel
    r.run_until_idle()
    fin = r.take(p.Finished)[0]
    assert fin.index == 2 and len(fin.token_ids) == 1 and fin.finish_reason == "length"   # 3 tokens
    r.assert_clean()


def test_a_pull_that_cannot_start_frees_its_blocks_for_the_next_in_line_at_once():
    r = Rig(role="generation", blocks=2)
    r.send(decode("a", list(b"abcd"), max_tokens=4), decode("b", list(b"xyz"), max_tokens=5))
    started = []
    for pull in r.sched.admit():
        started.append(pull.seq.request_id)
        if pull.seq.request_id == "a":
            r.sched.pull_failed(pull.seq.key, Code.KV_TRANSFER_FAILED, "bad handle")
    assert started == ["a", "b"]
    assert [m.request_id for m in r.take(p.Failed)] == ["a"]
    r.sched.drop_all()
    assert r.calls == [("cancel", "b#1")]
    r.assert_clean()


def test_max_tokens_beyond_the_context_is_refused_and_the_default_is_clipped():
    r = Rig(blocks=64, max_seq_len=20)
    r.send(generate("explicit", "x" * 5, max_tokens=16), generate("fits", "x" * 5, max_tokens=15),
           generate("default", "x" * 5, default_max_tokens=64), generate("unset", "x" * 5))
    fails = {m.request_id: m for m in r.take(p.Failed)}
    assert list(fails) == ["explicit"] and fails["explicit"].code == Code.INVALID_REQUEST
    assert fails["explicit"].message == ("max_tokens=16 with a prompt of 5 tokens needs 21 tokens, "
                                         "beyond the model's context (max_seq_len) of 20: ask for at most 15")
    assert {rid: s.max_new for rid, s in r.sched.seqs.items()} == {"fits": 15, "default": 15, "unset": 15}
    r.sched.drop_all()


def test_prompt_validation_and_kv_exhaustion_are_rejected_with_the_field_and_value():
    r = Rig(blocks=2, max_seq_len=50)
    r.send(generate("big", "x" * 8),
           generate("long", "x" * 50),
           p.Generate(request_id="vocab", attempt=1, token_ids=[1, 999]),
           generate("empty", ""),
           generate("param", "hi", top_p=2))
    fails = {m.request_id: m for m in r.take(p.Failed)}
    assert all(f.code == Code.INVALID_REQUEST for f in fails.values())
    assert fails["big"].message == ("prompt is 8 tokens; this worker's KV cache holds 8 tokens "
                                    "(kv_cache_config.max_tokens)")
    assert fails["long"].message == ("prompt is 50 tokens; the model's context (max_seq_len) is 50 "
                                     "tokens, leaving no room for output")
    assert fails["vocab"].message == "invalid token_ids: 999 is outside the vocabulary [0, 258)"
    assert fails["empty"].message == "the prompt encodes to no tokens"
    assert "top_p=2" in fails["param"].message
    r.assert_clean()


def test_wrong_role_is_an_internal_failure():
    r = Rig(role="context")
    r.send(generate("a", "hi"))
    f = r.take(p.Failed)[0]
    assert f.code == Code.INTERNAL and f.message == "worker w1 has role context, not both or generation"
    r.assert_clean()


def test_a_generation_worker_prefills_a_generate_itself():
    """Conditional disaggregation: the broker skips the context phase and sends the generation
    worker a Generate, which it runs as a `both` worker would."""
    r = Rig(role="generation")
    r.script["a"] = iter([ord("h"), ord("i"), EOS])
    r.send(generate("a", "abc", max_tokens=10))
    r.run_until_idle()
    msgs = r.take()
    assert text_of(msgs, "a") == "hi" and isinstance(msgs[-1], p.Finished)
    assert msgs[-1].prompt_tokens == 3 and ("prefill", "a", 0, 3) in r.steps
    r.assert_clean()


def test_reconnect_drops_everything_frees_every_block_and_releases_every_lease():
    ctx = Rig(role="context", blocks=8, max_num_tokens=2)
    ctx.script = {k: itertools.cycle(b"k") for k in "ab"}
    ctx.send(prefill("a", "aa"), prefill("b", "bbbbbb"), prefill("c", "c" * 24))
    ctx.step()
    ctx.step()
    assert ctx.sched.leases and ctx.sched.prefilling and ctx.sched.waiting
    ctx.sched.drop_all()
    assert ("release", "a#1") in ctx.calls
    ctx.assert_clean()

    gen = Rig(role="generation", blocks=8)
    gen.script = {"a": itertools.cycle(b"k")}
    gen.send(decode("a", [1, 2], max_tokens=4), decode("b", [3, 4], max_tokens=4))
    list(gen.sched.admit())
    gen.sched.pull_done("a#1", 0.0, 0)
    gen.step()
    assert gen.sched.running and gen.sched.pulling
    gen.sched.drop_all()
    assert gen.calls == [("cancel", "b#1")]
    gen.assert_clean()


def continuation(rid, prompt_ids, output, chars=None, attempt=2, **sampling):
    """``chars``: of the output's text, what the client has (all of it unless given)."""
    return p.Generate(request_id=rid, attempt=attempt, token_ids=prompt_ids, output_ids=list(output),
                      output_chars=len(output) if chars is None else chars, sampling=sampling)


@pytest.mark.parametrize("role", ["generation", "both"])
def test_a_continuation_prefills_prompt_and_output_then_decodes_from_the_same_step(role):
    r = Rig(role=role)
    r.script["a"] = iter(b"de")
    r.send(continuation("a", [1, 2, 3, 4, 5], b"abc", max_tokens=5))
    s = r.sched
    list(s.admit())
    # the prompt and every output token but the last go through prefill; no token is sampled
    chunk = s.next_prefill()
    assert (chunk.start, chunk.end, chunk.token_ids) == (0, 7, [1, 2, 3, 4, 5, 97, 98])
    assert chunk.last and not chunk.samples
    s.prefilled(chunk)
    assert r.take() == [] and s.seqs["a"].text == "abc" and s.seqs["a"].max_new == 5
    # the first decode step reads the last output token at its own position, as step 3
    batch = s.next_decode()
    assert (batch.tokens, batch.positions, batch.steps) == ([99], [7], [3])
    s.decoded(batch, [next(r.script["a"])])
    r.run_until_idle()
    msgs = r.take()
    assert [(m.index, list(m.token_ids), m.text) for m in msgs] == [(3, [100], "d"), (4, [101], "e")]
    fin = msgs[-1]
    assert isinstance(fin, p.Finished) and fin.finish_reason == "length" and fin.prompt_tokens == 5
    r.assert_clean()


def test_a_continuation_gives_back_the_text_held_for_a_stop_string():
    r = Rig(role="generation")
    r.script["a"] = iter(b"zxy")
    # "x" was held back where the tokens were sampled (it may start the stop string "xy")
    r.send(continuation("a", [1, 2], b"abx", chars=2, max_tokens=10, stop=["xy"]))
    r.run_until_idle()
    msgs = r.take()
    assert [m.text for m in msgs] == ["xz", "", ""] and msgs[-1].finish_reason == "stop"
    r.assert_clean()


def test_a_continuation_checks_its_output_ids():
    r = Rig(role="generation")
    r.send(continuation("a", [1, 2], [97, 999]))
    [f] = r.take(p.Failed)
    assert f.code == Code.INVALID_REQUEST and "output_ids" in f.message and "999" in f.message
    r.send(continuation("b", [1, 2], [97, EOS, 98], chars=2))
    [f] = r.take(p.Failed)
    assert f.code == Code.INVALID_REQUEST and "already ended" in f.message
    r.send(continuation("d", [1, 2], b"ab", chars=5))
    [f] = r.take(p.Failed)
    assert f.code == Code.INVALID_REQUEST and "output_chars=5" in f.message
    r.assert_clean()


def test_heartbeats_liveness_and_poll_timeout_follow_the_injected_clock():
    r = Rig(role="context")
    assert r.sched.heartbeat_if_due() and not r.sched.heartbeat_if_due()
    r.clock.t = 1000.75
    assert not r.sched.heartbeat_if_due()
    r.clock.t = 1001.0                               # heartbeat_ms after the first
    assert r.sched.heartbeat_if_due()
    assert len(r.take(p.Heartbeat)) == 2
    r.sched.heard_from_broker()
    r.clock.t = 1006.0                               # broker_timeout_ms of silence: not yet over
    assert r.sched.broker_silence() is None
    r.clock.t = 1006.5
    assert r.sched.broker_silence() == pytest.approx(5.5)
    r.clock.t = r.sched.next_heartbeat - 0.5
    assert r.sched.poll_timeout_ms() == 200          # idle: wake for the next heartbeat
    r.script = {"a": iter(b"A")}
    r.send(prefill("a", "abc"))
    assert list(r.sched.admit()) == []               # no pull on a context worker
    assert r.sched.poll_timeout_ms() == 0            # prefill to run
    r.step()
    assert r.sched.leases and r.sched.poll_timeout_ms() == 20   # a held lease may expire
    r.sched.drop_all()
    r.assert_clean()


def test_the_scheduler_imports_no_torch_no_sockets_and_no_transfer():
    import ast
    import workers.scheduler as mod
    tree = ast.parse(open(mod.__file__).read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"torch", "zmq", "socket", "transfer"}


class CountingTokenizer(ByteTokenizer):
    """The byte tokenizer, counting the characters it was asked to encode."""
    max_token_chars = 4
    encoded = 0

    def encode(self, text):
        self.encoded += len(text)
        return super().encode(text)


@pytest.mark.parametrize("over", [
    {"prompt": "x" * 4001},
    {"messages": [{"role": "user", "content": "x" * 2000}, {"role": "user", "content": "y" * 2001}]},
])
def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_encoded(over):
    rig = Rig(role="context", max_seq_len=1000)
    tok = rig.sched.tok = CountingTokenizer()
    rig.send(p.Prefill("r", 1, **over))
    failed = rig.take(p.Failed)
    assert [f.code for f in failed] == [Code.INVALID_REQUEST]
    assert "4001 characters" in failed[0].message and "max_seq_len 1000" in failed[0].message
    assert tok.encoded == 0, "the prompt was encoded before it was refused"
    rig.send(p.Prefill("ok", 1, prompt="x" * 4000))     # at the bound: encoded, then judged by tokens
    assert tok.encoded == 4000


def test_a_context_worker_is_idle_only_once_its_leases_are_released_and_heartbeats_tell_draining():
    r = Rig(role="context")
    assert r.sched.idle
    r.sched.draining = True
    r.script["a"] = iter([ord("x")])
    r.send(prefill("a", "abcdef"))
    assert not r.sched.idle                     # admitted, not yet prefilled
    r.run_until_idle()
    assert not r.sched.idle and r.sched.leases  # its KV held for the pull
    assert r.sched.heartbeat_if_due()
    [hb] = r.take(p.Heartbeat)
    assert hb.draining and hb.leases == 1
    r.sched.release_lease("a#1")                # pulled (or released, or expired)
    assert r.sched.idle
    r.assert_clean()
