"""End to end on real processes with the tiny model: broker, context, generation and both workers."""
import asyncio
import random

import msgpack
import pytest

from broker import protocol as p
from client import AsyncClient, Client, RequestFailed
from tests.harness import Deployment, raw_client

pytestmark = pytest.mark.timeout(180)


def prompts_for_equality():
    """20+ prompts from 1 token to many KV blocks (block size 16), as token ids and as text."""
    rng = random.Random(1234)
    lengths = [1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 100, 128, 150, 200, 255, 256, 257, 300]
    out = [{"token_ids": [rng.randrange(256) for _ in range(n)]} for n in lengths]
    out += [{"prompt": "Hello, world"}, {"prompt": "The quick brown fox " * 12},
            {"messages": [{"role": "user", "content": "What is the capital of France?"}]}]
    return out


@pytest.fixture(scope="module")
def disagg():
    with Deployment() as d:
        d.add_worker("context", "ctx0")
        d.add_worker("generation", "gen0")
        yield d


@pytest.fixture(scope="module")
def agg():
    with Deployment() as d:
        d.add_worker("both", "both0")
        yield d


def run_all(dep, prompts, **sampling):
    results = []
    with Client(dep.frontend, timeout=60) as c:
        for kw in prompts:
            chunks = list(c.stream(**kw, **sampling))
            results.append(chunks)
    return results


def test_disaggregated_equals_aggregated_token_for_token(disagg, agg):
    prompts = prompts_for_equality()
    sampling = dict(max_tokens=12, ignore_eos=True)
    d_runs = run_all(disagg, prompts, **sampling)
    a_runs = run_all(agg, prompts, **sampling)
    for kw, d_chunks, a_chunks in zip(prompts, d_runs, a_runs):
        d_ids = [t for ch in d_chunks for t in ch.token_ids]
        a_ids = [t for ch in a_chunks for t in ch.token_ids]
        assert len(a_ids) == 12
        assert d_ids == a_ids, f"prompt {kw}: disaggregated {d_ids} != aggregated {a_ids}"
        # in order, no gap, no duplicate: the first token (from the context phase) appears once
        indices = [ch.index + i for ch in d_chunks for i in range(len(ch.token_ids))]
        assert indices == list(range(12))
        assert "".join(ch.text for ch in d_chunks) == "".join(ch.text for ch in a_chunks)
    disagg.wait_idle()
    agg.wait_idle()


def test_seeded_sampling_is_equal_too(disagg, agg):
    prompts = [{"token_ids": list(range(40, 40 + n))} for n in (5, 40)]
    sampling = dict(max_tokens=10, temperature=0.9, top_k=40, top_p=0.95, seed=7, ignore_eos=True,
                    repetition_penalty=1.1)
    d = [[t for ch in r for t in ch.token_ids] for r in run_all(disagg, prompts, **sampling)]
    a = [[t for ch in r for t in ch.token_ids] for r in run_all(agg, prompts, **sampling)]
    assert d == a


def test_completion_carries_usage_and_timings(disagg):
    with Client(disagg.frontend, timeout=60) as c:
        r = c.generate(token_ids=[5] * 40, max_tokens=6, ignore_eos=True)
    assert r.finish_reason == "length" and len(r.token_ids) == 6
    assert r.usage == {"prompt_tokens": 40, "completion_tokens": 6}
    for k in ("queue", "prefill", "kv_transfer", "ttft", "total"):
        assert r.timings[k] is not None and r.timings[k] >= 0, k
    assert r.timings["kv_transfer"] > 0 and r.timings["total"] >= r.timings["ttft"]
    disagg.wait_idle()


def test_max_tokens_one_finishes_in_the_context_phase(disagg):
    with Client(disagg.frontend, timeout=60) as c:
        r = c.generate(token_ids=[9] * 20, max_tokens=1)
    assert len(r.token_ids) == 1 and r.finish_reason == "length"
    disagg.wait_idle()


def test_stop_string_cuts_the_text(agg):
    with Client(agg.frontend, timeout=60) as c:
        full = c.generate(prompt="abc", max_tokens=20, ignore_eos=True)
        assert len(full.text) > 3
        stop = full.text[2:4]
        r = c.generate(prompt="abc", max_tokens=20, ignore_eos=True, stop=[stop])
    assert r.finish_reason == "stop" and stop not in r.text
    assert full.text.startswith(r.text)
    agg.wait_idle()


async def test_64_concurrent_requests_batch_and_all_finish(disagg):
    async with AsyncClient(disagg.frontend, timeout=120) as c:
        tasks = [c.generate(token_ids=[(i * 7 + j) % 256 for j in range(1 + i % 50)], max_tokens=16,
                            ignore_eos=True) for i in range(64)]
        results = await asyncio.gather(*tasks)
    assert len({r.request_id for r in results}) == 64
    assert all(len(r.token_ids) == 16 and r.finish_reason == "length" for r in results)
    s = disagg.wait_idle()
    gen = next(w for w in s["workers"] if w["role"] == "generation")
    assert gen["max_decode_batch"] > 1, "decode steps never batched several requests"
    assert s["counters"]["finished"] >= 64


def test_cancel_mid_stream_frees_everything(disagg):
    with Client(disagg.frontend, timeout=60) as c:
        it = c.stream(token_ids=[3] * 30, max_tokens=2000, ignore_eos=True)
        first = next(it)
        assert first.index == 0
        it.close()                  # breaking out cancels the request
        r = c.generate(token_ids=[4] * 5, max_tokens=3)   # the connection still serves
        assert len(r.token_ids) == 3
    disagg.wait_idle()


def test_bad_input_gets_clear_errors_and_the_broker_keeps_serving(disagg):
    with raw_client(disagg.frontend) as s:
        s.send_multipart([b"garbage"])                                   # wrong version
        s.send_multipart([p.VERSION])                                    # no command byte
        s.send_multipart([p.header(0x63) + b"\x80"])                     # unknown command
        s.send_multipart([p.header(p.Submit.CMD) + b"\xc1\xc1"])         # undecodable body
        bad = p.Submit("r-bad", prompt="x").body()
        bad["sampling"] = {"top_p": 7}
        s.send_multipart([p.header(p.Submit.CMD) + msgpack.packb(bad)])  # invalid sampling value
        replies = []
        while s.poll(2000):
            replies.extend(p.decode_all(s.recv_multipart()))
        errors = [m for m in replies if isinstance(m, p.Error)]
        assert any("wrong protocol version" in e.message for e in errors)
        assert any("no command byte" in e.message for e in errors)
        assert any("unknown command" in e.message for e in errors)
        assert any("undecodable" in e.message for e in errors)
        [samp] = [e for e in errors if e.request_id == "r-bad"]
        assert samp.code == p.Code.INVALID_REQUEST and "top_p" in samp.message and "7" in samp.message
    with Client(disagg.frontend, timeout=60) as c:
        with pytest.raises(RequestFailed) as e:
            c.generate(token_ids=[1] * 5000, max_tokens=4)               # longer than the context
        assert e.value.code == "INVALID_REQUEST" and "5000" in e.value.message \
            and "max_seq_len" in e.value.message
        with pytest.raises(RequestFailed) as e:
            c.generate(token_ids=[1, 2, 999], max_tokens=4)              # outside the vocabulary
        assert "999" in e.value.message
        with pytest.raises(RequestFailed) as e:
            c.generate(prompt="hi", temperature=-1)                       # refused before sending
        assert "temperature" in str(e.value) and "-1" in str(e.value)
        assert len(c.generate(prompt="still serving", max_tokens=2).token_ids) == 2
    disagg.wait_idle()


def test_prompt_longer_than_kv_capacity_is_rejected():
    with Deployment() as d:
        d.add_worker("both", "small", options={"kv_cache_config": {"max_tokens": 64}})
        with Client(d.frontend, timeout=60) as c:
            with pytest.raises(RequestFailed) as e:
                c.generate(token_ids=[1] * 100, max_tokens=2)
            assert "100" in e.value.message and "kv_cache_config.max_tokens" in e.value.message
            # a prompt that fits still works; max_tokens past the pool ends with "length"
            r = c.generate(token_ids=[1] * 40, max_tokens=100, ignore_eos=True)
            assert r.finish_reason == "length" and len(r.token_ids) == 64 - 40
        d.wait_idle()


def test_client_gone_mid_stream_frees_its_work(disagg):
    with raw_client(disagg.frontend) as s:
        s.send_multipart(p.Submit("gone-1", token_ids=[7] * 20,
                                  sampling={"max_tokens": 4000, "ignore_eos": True}).encode())
        seen = 0
        while seen < 3 and s.poll(10000):
            seen += sum(isinstance(m, p.Tokens) for m in p.decode_all(s.recv_multipart()))
        assert seen >= 3
    # the client vanished without a Cancel
    stats = disagg.wait_idle()
    assert stats["counters"]["cancelled"] >= 1


def test_a_batch_of_submits_is_served_and_a_bad_one_fails_alone(disagg):
    good = [p.Submit(f"batch-{i}", token_ids=[5 + i] * 6, sampling={"max_tokens": 3, "ignore_eos": True})
            for i in range(4)]
    bad = p.Submit("batch-bad", prompt="x").body()
    bad["sampling"] = {"max_tokens": -2}
    items = msgpack.unpackb(p.encode_many(good)[0][p.HEADER_LEN:])
    items.insert(2, [p.Submit.CMD, bad])
    with raw_client(disagg.frontend) as s:
        s.send_multipart([p.header(p.BATCH) + msgpack.packb(items)])
        finals, errors, tokens = {}, {}, {}
        while len(finals) + len(errors) < 5 and s.poll(30000):
            for m in p.decode_all(s.recv_multipart()):
                if isinstance(m, p.Final):
                    finals[m.request_id] = m
                    tokens.setdefault(m.request_id, []).extend(m.token_ids)   # the last ones
                elif isinstance(m, p.Error):
                    errors[m.request_id] = m
                elif isinstance(m, p.Tokens):
                    tokens.setdefault(m.request_id, []).extend(m.token_ids)
    assert sorted(finals) == [m.request_id for m in good]
    assert all(len(tokens[r]) == 3 and finals[r].usage["completion_tokens"] == 3 for r in finals)
    assert list(errors) == ["batch-bad"] and errors["batch-bad"].code == p.Code.INVALID_REQUEST
    assert "max_tokens" in errors["batch-bad"].message and "-2" in errors["batch-bad"].message
    disagg.wait_idle()
