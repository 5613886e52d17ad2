"""Routing (docs/architecture.md §2, Routing): each router's choice on fake workers driven through
the broker's state machine with a fake clock; KV events from the worker's prefix cache to the
broker's index, bounded and validated; the keys equal on both sides; conditional
disaggregation; and end to end on the tiny model: kv_cache_aware keeps a prefix on the worker
that holds it, and prompts that skip the context phase give the same tokens as aggregated
serving, with every block and lease back at the end."""
from __future__ import annotations

import itertools
import random
import textwrap

import msgspec
import pytest
import yaml

from broker import protocol as p
from broker.config import BrokerConfig, RouterSettings, Routing, parse_disagg_config
from broker.kv_index import MIN_KEYS
from broker.kv_keys import (KEY_BYTES, TEXT_CHUNK, block_hashes, chat_text, packed_block_hashes, text_keys,
                            text_ties)
from broker.state import BrokerState
from client import Client
from tests.harness import Deployment
from tests.test_broker_state import FakeClock, of
from tests.test_scheduler import BLOCK, Rig, prefill
from workers.engine.prefix_cache import CachingAllocator

C1 = b"client-1"
BS = 4


def state(clock=None, ctx="kv_cache_aware", gen="load_balancing", local=None, **ctx_opts):
    routing = Routing(RouterSettings(ctx, **ctx_opts), RouterSettings(gen), local)
    return BrokerState(BrokerConfig(heartbeat_interval_s=1.0, liveness=3, request_timeout_s=60,
                                    kv_lease_s=10, max_attempts=2), clock or FakeClock(), routing=routing)


def ready(st, ident, role, slots=4, blocks=100, block_size=BS):
    return st.on_worker(ident, p.Ready(ident.decode(), role, "tiny", slots, blocks,
                                       {"backend": "ZMQ", "endpoint": "tcp://x"}, 1, 1000,
                                       tokens_per_block=block_size))


_rid = itertools.count()


def submit(st, **kw):
    return st.on_client(C1, p.Submit(request_id=f"r{next(_rid)}", **kw))


def prefilled_on(out):
    """The workers the Prefills (or Generates) of this batch went to."""
    return [o.identity for o in out if isinstance(o.msg, (p.Prefill, p.Generate))]


def publish(st, ident, keys, removed=(), clear=False):
    for m in p.KvEvents.of(keys, removed, clear):
        st.on_worker(ident, m)


# ---------------------------------------------------------------------------------------------
# each router on fake workers

def test_round_robin_takes_the_workers_in_turn_and_passes_over_a_full_one():
    st = state(ctx="round_robin")
    for w in (b"a", b"b", b"c"):
        ready(st, w, "context", slots=2)
    ready(st, b"g", "generation")
    got = [prefilled_on(submit(st, prompt="x"))[0] for _ in range(6)]
    assert got == [b"a", b"b", b"c", b"a", b"b", b"c"]
    assert prefilled_on(submit(st, prompt="x")) == []          # all full: it waits
    assert st.prefill_queue.waiting() == 1


def test_load_balancing_by_active_requests_or_by_prompt_tokens():
    for use_tokens, want in ((False, [b"a", b"b", b"a"]), (True, [b"a", b"b", b"b"])):
        st = state(ctx="load_balancing", use_tokens=use_tokens)
        ready(st, b"a", "context")
        ready(st, b"b", "context")
        ready(st, b"g", "generation")
        got = [prefilled_on(submit(st, token_ids=list(range(3, 3 + n))))[0] for n in (200, 10, 10)]
        # requests: a tie (turn 0: a), then b (a has one), then a tie again (turn 2: a);
        # tokens: a holds 200 prompt tokens, b 10: b again
        assert got == want, use_tokens


def test_kv_cache_aware_picks_the_worker_holding_the_longest_prefix_against_its_load():
    st = state(ctx="kv_cache_aware")
    for w in (b"a", b"b", b"c"):
        ready(st, w, "context", slots=8)
    ready(st, b"g", "generation")
    prompt = [random.Random(1).randrange(3, 250) for _ in range(6 * BS + 2)]     # 6 full blocks
    keys = block_hashes(prompt, BS, 6)          # what a worker's prefix cache publishes
    publish(st, b"a", keys[:3])
    publish(st, b"b", keys[:5])
    publish(st, b"c", [keys[0]] + keys[2:])     # a gap after the first block: matches one
    # score: matched/6 - active/8; a: 3/6 = 0.5 idle, b: 5/6 = 0.83 less its load
    for load in range(3):
        assert prefilled_on(submit(st, token_ids=prompt)) == [b"b"], load     # 0.83 - load/8
    assert prefilled_on(submit(st, token_ids=prompt)) == [b"a"]              # 0.83 - 3/8 < 0.5
    # another prefix: nobody holds it, so load decides (c is idle)
    assert prefilled_on(submit(st, token_ids=[7] * 30)) == [b"c"]
    # a text prompt routes on its text keys
    text = "The quick brown fox jumps over the lazy dog. " * 8
    publish(st, b"c", text_keys(text))
    assert prefilled_on(submit(st, prompt=text + " And then?")) == [b"c"]
    chat = [{"role": "system", "content": text}, {"role": "user", "content": "hi"}]
    publish(st, b"a", text_keys(chat_text(chat[:1]), chat=True))
    assert prefilled_on(submit(st, messages=chat)) == [b"a"]     # a chat's keys are its own


def test_a_worker_with_no_free_block_comes_last_and_a_short_prompt_scores_on_load():
    st = state(ctx="kv_cache_aware")
    ready(st, b"a", "context")
    ready(st, b"b", "context")
    ready(st, b"g", "generation")
    prompt = list(range(10, 10 + 3 * BS))
    publish(st, b"a", block_hashes(prompt, BS, 3))
    st.on_worker(b"a", p.Heartbeat(0, 3))          # every block held by leases
    assert prefilled_on(submit(st, token_ids=prompt)) == [b"b"]
    st.on_worker(b"a", p.Heartbeat(50, 0))
    assert prefilled_on(submit(st, token_ids=[1, 2])) == [b"a"]      # no key: load (b has one)


# ---------------------------------------------------------------------------------------------
# KV events: bounded, validated, and the same keys on both sides

def test_kv_events_are_validated_and_bounded_per_message():
    m = p.KvEvents(b"k" * 32, b"r" * 16, True)
    [back] = p.decode_all(m.encode())
    assert back == m and back.keys("stored") == [b"k" * 16] * 2 and back.keys("removed") == [b"r" * 16]
    for bad in ({"stored": b"x" * 17}, {"removed": b"x" * (KEY_BYTES * p.MAX_KV_EVENTS + 16)},
                {"stored": [b"x" * 16]}, {"clear": 1}):
        with pytest.raises(p.ProtocolError):
            p.decode([_raw(p.KvEvents, bad)])
    split = p.KvEvents.of([bytes([i % 256]) * 16 for i in range(2500)], clear=True)
    assert [len(x.keys("stored")) for x in split] == [1024, 1024, 452]
    assert [x.clear for x in split] == [True, False, False]           # clear once, first
    assert p.KvEvents.of([], clear=True) == [p.KvEvents(clear=True)] and p.KvEvents.of() == []


def _raw(cls, body: dict) -> bytes:
    """A frame of ``cls``'s command with this body, unchecked (what a broken worker could send)."""
    return p.header(cls.CMD) + msgspec.msgpack.encode(body)


def test_the_broker_keeps_a_bounded_key_set_per_worker_and_drops_it_with_the_worker():
    clock = FakeClock()
    st = state(clock)
    ready(st, b"a", "context", blocks=10)
    ready(st, b"g", "generation")
    keys = [i.to_bytes(16, "little") for i in range(MIN_KEYS + 500)]
    publish(st, b"a", keys)
    w = st.workers[b"a"]
    assert len(w.kv_keys) == MIN_KEYS                  # at most max(4096, 4 per block)
    publish(st, b"a", [], removed=keys[:100])
    assert len(w.kv_keys) == MIN_KEYS - 100
    publish(st, b"a", keys[:3], clear=True)            # a resync: only these now
    assert w.kv_keys == set(keys[:3]) and st.stats()["workers"][0]["kv_keys"] == 3
    clock.advance(10)                                  # silent: expired, its keys go with it
    st.tick()
    assert b"a" not in st.workers
    ready(st, b"a", "context", blocks=10)
    assert st.workers[b"a"].kv_keys == set()


def test_events_are_ignored_when_no_router_reads_them():
    st = state(ctx="round_robin")
    ready(st, b"a", "context")
    publish(st, b"a", [b"k" * 16])
    assert st.workers[b"a"].kv_keys == set()


def test_the_allocator_records_stored_and_evicted_keys_with_their_text_keys():
    al = CachingAllocator(3, BS)
    ids = list(range(3 * BS))
    blocks = al.allocate(3)
    assert al.store(blocks, ids) == 3
    text = "t" * (2 * TEXT_CHUNK)
    tk = text_keys(text)
    al.tie(tk, [blocks[0], blocks[2]])
    stored, removed = al.take_events()
    assert stored == block_hashes(ids, BS, 3) + tk and removed == [] and al.take_events() == ([], [])
    al.free(blocks)
    al.allocate(1)                                 # evicts the tail block first, and its text key
    assert al.take_events() == ([], [block_hashes(ids, BS, 3)[2], tk[1]])
    assert set(al.keys()) == set(block_hashes(ids, BS, 2)) | {tk[0]}


def test_text_keys_tie_to_the_block_their_text_ends_in():
    # 2.5 chars per token: chunk j's 64(j+1) characters need 25.6(j+1) tokens: 26 and 52
    assert text_ties(2, 160, 64, 16, 4) == [1, 3]
    assert text_ties(2, 160, 64, 16, 3) == [1]                      # block 3 is not full
    assert text_ties(3, 4 * TEXT_CHUNK, 4 * TEXT_CHUNK, 16, 100) == [3, 7, 11]
    assert text_ties(3, 4 * TEXT_CHUNK, 4 * TEXT_CHUNK, 16, 8) == [3, 7]      # only full blocks
    assert text_ties(2, 0, 5, 16, 1) == []


def test_packed_and_listed_token_keys_agree():
    ids = [random.Random(3).randrange(2**32) for _ in range(70)]
    assert packed_block_hashes(p.TokenIds(ids).packed, 16, 99) == block_hashes(ids, 16, 4)
    assert len(block_hashes(ids, 16, 2)) == 2 and block_hashes(ids, 16, 4)[:2] == block_hashes(ids, 16, 2)


def _worker_rig(role="both", blocks=256):
    r = Rig(role=role, alloc=CachingAllocator(blocks, BLOCK))
    r.script = {k: itertools.cycle(b"xyz") for k in ("a", "b", "c", "d")}
    return r


def _forward(rig, st, ident):
    """Hand the worker's KV events to the broker, as its socket would."""
    for m in rig.take(p.KvEvents):
        st.on_worker(ident, m)


def test_a_worker_publishes_what_it_caches_and_the_broker_routes_to_it():
    """The scheduler's events, fed to the broker's state: the keys it computes for a request
    (token ids, text, chat) are the ones the worker published."""
    st = state(ctx="kv_cache_aware")
    ready(st, b"a", "context", block_size=BLOCK)
    ready(st, b"b", "context", block_size=BLOCK)
    ready(st, b"g", "generation", block_size=BLOCK)
    rig = _worker_rig("context", blocks=160)
    ids = list(range(40, 40 + 9 * BLOCK))
    text = "Once upon a time there was a broker that routed requests. " * 4
    chat = [{"role": "user", "content": text}]
    for rid, msg in (("a", p.Prefill("a", 1, token_ids=ids)), ("b", prefill("b", text)),
                     ("c", p.Prefill("c", 1, messages=chat))):
        rig.send(msg)
        rig.run_until_idle()
        rig.sched.release_lease(f"{rid}#1")
    _forward(rig, st, b"b")
    w = st.workers[b"b"]
    assert set(block_hashes(ids, BLOCK, 9)) <= w.kv_keys
    assert set(text_keys(text)) <= w.kv_keys          # the byte tokenizer: every text key is covered
    assert set(text_keys(chat_text(chat), chat=True)[:2]) <= w.kv_keys
    assert prefilled_on(submit(st, token_ids=ids + [1, 2])) == [b"b"]
    assert prefilled_on(submit(st, prompt=text + "The end.")) == [b"b"]
    assert prefilled_on(submit(st, messages=chat + [{"role": "assistant", "content": "ok"}])) == [b"b"]
    # a reconnect publishes everything again, clearing what the broker held
    rig.sched.kv_resync()
    [m] = rig.take(p.KvEvents)
    assert m.clear and set(m.keys("stored")) == w.kv_keys
    # eviction: the worker reuses the oldest blocks for another prompt; the broker hears of it
    rig.send(prefill("d", "z" * 600))
    rig.run_until_idle()
    rig.sched.release_lease("d#1")
    _forward(rig, st, b"b")
    assert not set(block_hashes(ids, BLOCK, 9)) & w.kv_keys
    rig.take()
    rig.assert_clean()


def test_a_generation_worker_publishes_the_blocks_it_pulled():
    rig = _worker_rig("generation")
    ids = list(range(50, 50 + 5 * BLOCK + 1))
    rig.send(p.Decode("a", 1, ids, 97, "a", {"key": "a#1"}, {"max_tokens": 3}, prompt="x" * 200))
    [pull] = list(rig.sched.admit())
    rig.sched.pull_done(pull.seq.key, 0.01, 100)
    [m] = rig.take(p.KvEvents)
    assert m.keys("stored")[:5] == block_hashes(ids, BLOCK, 5)
    assert m.keys("stored")[5:] == text_keys("x" * 200)[:len(m.keys("stored")) - 5]
    rig.run_until_idle()
    # a later prompt with that prefix prefills only its own tokens there
    rig.send(p.Generate("b", 1, token_ids=ids + [9, 9], sampling={"max_tokens": 1}))
    rig.run_until_idle()
    assert ("prefill", "b", 5 * BLOCK, len(ids) + 2) in rig.steps
    rig.take()
    rig.assert_clean()


# ---------------------------------------------------------------------------------------------
# conditional disaggregation

def test_conditional_disagg_prefills_a_short_uncached_part_on_the_generation_worker():
    st = state(local=2 * BS)
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation")
    prompt = list(range(100, 100 + 6 * BS))
    publish(st, b"gen", block_hashes(prompt, BS, 4))
    out = submit(st, token_ids=prompt)                        # 2 blocks uncached: 8 <= 8
    [gen] = of(out, p.Generate)
    assert prefilled_on(out) == [b"gen"] and st.counters["context_skipped"] == 1
    out = submit(st, token_ids=prompt + [1])                  # 9 uncached: the context phase
    assert prefilled_on(out) == [b"ctx"] and of(out, p.Prefill)
    out = submit(st, token_ids=[5] * (2 * BS))                # short, nothing cached: local
    assert prefilled_on(out) == [b"gen"] and st.counters["context_skipped"] == 2
    assert "disagg_context_skipped_total 2.0" in st.metrics.render()
    # the local request ends as an aggregated one: its prefill is counted, nothing is leased
    out = st.on_worker(b"gen", p.Finished(gen.request_id, gen.attempt, "length", prompt_tokens=len(prompt),
                                         index=0, token_ids=[3], cached_tokens=4 * BS))
    [fin] = of(out, p.Final)
    assert fin.usage["cached_tokens"] == 4 * BS and st.counters["prefill_cached_tokens"] == 4 * BS
    assert not st.workers[b"ctx"].leases


def test_conditional_disagg_goes_to_the_context_worker_when_the_generation_worker_is_full():
    st = state(local=1000)
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation", slots=1)
    assert prefilled_on(submit(st, prompt="hi")) == [b"gen"]
    assert prefilled_on(submit(st, prompt="hi")) == [b"ctx"]


def test_text_prompts_estimate_their_tokens_from_what_the_workers_tokenized():
    st = state(local=40)
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation", slots=1)
    text = "w" * 100
    # 100 characters at the default 4 per token: 25 tokens <= 40: the generation worker
    [gen] = of(submit(st, prompt=text), p.Generate)
    st.on_worker(b"gen", p.Finished(gen.request_id, gen.attempt, "length", prompt_tokens=100, index=0,
                                    token_ids=[3]))
    assert st.pool.index.chars_per_token["tiny"] == 1.0       # it was 100 tokens: learned
    assert prefilled_on(submit(st, prompt=text)) == [b"ctx"]   # 100 > 40 now
    publish(st, b"gen", text_keys(text))                       # one 64-character chunk cached
    assert prefilled_on(submit(st, prompt=text)) == [b"gen"]   # 100 - 64 = 36 <= 40


# ---------------------------------------------------------------------------------------------
# end to end, tiny model

def _config(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    parse_disagg_config(yaml.safe_load(path.read_text()), str(path))   # valid
    return str(path)


def _groups():
    """Three prefix groups of three requests each, interleaved (every group's first request,
    then every second, ...): token ids, text, and chat, each a 64-token (byte) prefix and an end
    of its own."""
    rng = random.Random(11)
    ids = [rng.randrange(3, 250) for _ in range(64)]
    text = "".join(rng.choice("abcdefghij ") for _ in range(64))
    chat = "".join(rng.choice("klmnopqrst ") for _ in range(64))
    groups = [[{"token_ids": ids + [rng.randrange(3, 250) for _ in range(8)]} for _ in range(3)],
              [{"prompt": text + f" end {i:03d}"} for i in range(3)],
              [{"messages": [{"role": "user", "content": chat + f" q{i:03d}"}]} for i in range(3)]]
    return [groups[g][i] for i in range(3) for g in range(3)]


def _serve(dep, requests, **sampling):
    with Client(dep.frontend, timeout=60) as c:
        results = [c.generate(**r, **sampling) for r in requests]
    return [r.token_ids for r in results], [r.usage["cached_tokens"] for r in results]


@pytest.mark.timeout(300)
def test_kv_cache_aware_keeps_each_prefix_on_the_context_worker_that_holds_it(tmp_path):
    cached = {}
    for router in ("round_robin", "kv_cache_aware"):
        path = _config(tmp_path, f"{router}.yaml", f"""\
            context_servers: {{router: {{type: {router}}}}}
            """)
        with Deployment(config=path) as dep:
            dep.add_worker("context", "ctx-a")
            dep.add_worker("context", "ctx-b")
            dep.add_worker("generation", "gen")
            _, cached[router] = _serve(dep, _groups(), max_tokens=4, ignore_eos=True)
            s = dep.wait_idle()
            assert s["counters"]["finished"] == 9
    # kv_cache_aware: each group's later requests go where its prefix is and reuse 64 tokens
    # (4 blocks); round robin sends every other one to the worker without it
    kv, rr = cached["kv_cache_aware"], cached["round_robin"]
    assert kv[:3] == [0, 0, 0] and all(c >= 64 for c in kv[3:]), kv
    assert sum(rr) < sum(kv) and rr[3:6] == [0, 0, 0], rr


@pytest.mark.timeout(300)
def test_conditional_disagg_skips_the_context_phase_and_gives_the_tokens_of_aggregated_serving(tmp_path):
    path = _config(tmp_path, "cond.yaml", """\
        conditional_disagg_config: {max_local_prefill_length: 24}
        """)
    rng = random.Random(5)
    long = [rng.randrange(3, 250) for _ in range(80)]
    requests = [{"token_ids": long[:10]},                                  # short: local
                {"token_ids": long},                                       # 80 uncached: context
                {"token_ids": long},                                       # pulled before: local
                {"token_ids": long + [rng.randrange(3, 250) for _ in range(30)]},   # 30 > 24: context
                {"token_ids": long[:40] + [rng.randrange(3, 250) for _ in range(40)]},  # 48: context
                {"prompt": "hello there"}]                                 # short text: local
    with Deployment() as agg, Deployment(config=path) as cond:
        agg.add_worker("both", "agg")
        cond.add_worker("context", "ctx")
        cond.add_worker("generation", "gen")
        for sampling in ({"max_tokens": 8, "ignore_eos": True},
                         {"max_tokens": 8, "ignore_eos": True, "temperature": 0.9, "seed": 3}):
            want, _ = _serve(agg, requests, **sampling)
            got, _ = _serve(cond, requests, **sampling)
            assert got == want
        for dep in (agg, cond):
            dep.wait_idle()            # every block and lease back, on both deployments
        s = cond.stats()["counters"]
        # pass 1 skips 3 (short, repeat, text); pass 2 all 6: the generation worker holds every
        # prompt it pulled, and 4 and 5 now miss at most 14 tokens
        assert s["context_skipped"] == 9 and s["finished"] == 12, s
        with Client(cond.frontend) as c:
            text = c.ping(metrics=True)["prometheus"]
        assert "disagg_context_skipped_total 9.0" in text


def test_a_decode_carries_the_text_only_where_the_generation_workers_keys_are_read():
    for gen, want in (("load_balancing", None), ("kv_cache_aware", "hello")):
        st = state(gen=gen)
        ready(st, b"ctx", "context")
        ready(st, b"gen", "generation")
        [pre] = of(submit(st, prompt="hello"), p.Prefill)
        out = st.on_worker(b"ctx", p.ContextDone(pre.request_id, pre.attempt, 7, "x", [1, 2, 3], {"k": 1}))
        [dec] = of(out, p.Decode)
        assert dec.prompt == want and dec.messages is None, gen
