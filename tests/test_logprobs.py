"""Log-probabilities (``SamplingParams.logprobs``, ``prompt_logprobs``), ``n``, ``best_of`` and
``echo``: the sampler's arithmetic, the wire bounds, the OpenAI shapes, and on real processes with
the tiny model, every value against the engine run directly in this process (its log-softmax of
the logits it sampled from), aggregated and disaggregated, across a stream migration, through the
``openai`` SDK and Triton's ``return_log_probs``."""
import asyncio
import json
import os
import signal

import openai
import pytest
import torch

from broker import protocol as p
from broker.protocol import Logprobs, ProtocolError, SamplingParams, TokenLogprob
from client import Client
from client.openai_choices import ChoiceLogprobs, best_of, choice_seeds, total_usage
from tests.harness import Deployment
from workers.engine.kv_cache import KVCache
from workers.engine.loaders import load_model
from workers.engine.runner import ModelRunner
from workers.engine.sampler import prompt_logprobs, sample, token_logprobs

pytestmark = pytest.mark.timeout(240)

PROMPT = [5, 17, 99, 3, 42, 7, 7, 120, 64, 33]
TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# the sampler and the wire, without processes

def test_token_logprobs_are_the_raw_log_softmax_whatever_the_sampling():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=0.7, seed=1, repetition_penalty=1.5, logit_bias=((4, 50.0),),
                             logprobs=0),
              SamplingParams(temperature=1.0, seed=2)]                 # asks for none
    tokens = sample(logits, params, [[4, 9]] * 3, [1, 1, 1])
    assert tokens[1] == 4                                              # the bias chose it...
    out = token_logprobs(logits, params, tokens)
    ref = torch.log_softmax(logits, -1)
    assert out[2] is None
    lp, top = out[0]
    assert abs(lp - ref[0, tokens[0]].item()) < 1e-6 and tokens[0] == int(logits[0].argmax())
    assert [t for t, _ in top] == ref[0].topk(3).indices.tolist()
    assert [v for _, v in top] == pytest.approx(ref[0].topk(3).values.tolist(), abs=1e-6)
    lp, top = out[1]            # ...but its log-probability is the model's, before bias and penalty
    assert abs(lp - ref[1, 4].item()) < 1e-6 and top == []


def test_no_row_asking_costs_nothing_and_extremes_stay_in_bounds():
    logits = torch.randn(2, 50)
    assert token_logprobs(logits, [SamplingParams()] * 2, [0, 1]) is None
    logits[0, 3] = float("-inf")
    lp, top = token_logprobs(logits, [SamplingParams(logprobs=20)] * 2, [3, 1])[0]
    assert lp == p.MIN_LOGPROB and len(top) == 20
    entries = prompt_logprobs(torch.randn(4, 50), [7, 8, 9], 2)
    assert len(entries) == 3 and all(len(t) == 2 for _, t in entries)


@pytest.mark.parametrize("field,value", [("logprobs", 21), ("logprobs", -1), ("logprobs", True),
                                         ("prompt_logprobs", 21), ("logprobs", 1.5)])
def test_logprob_counts_are_bounded_and_named(field, value):
    with pytest.raises(ProtocolError, match=f"{field}="):
        SamplingParams(**{field: value})


def test_the_wire_carries_one_bounded_entry_per_token():
    entry = Logprobs(TokenLogprob(5, -0.25, b"x"), [TokenLogprob(5, -0.25, b"x"), TokenLogprob(6, -2.0, b"\xe2")])
    msg = p.Tokens("r", 0, [5], "x", logprobs=[entry])
    assert p.decode_all(msg.encode())[0] == msg
    with pytest.raises(ProtocolError, match="1 logprobs for 2 tokens"):
        p.Tokens("r", 0, [5, 6], "x", logprobs=[entry])
    with pytest.raises(ProtocolError, match="logprobs for 1 tokens"):
        p.Final("r", "stop", token_ids=[5], logprobs=[])
    positive = p.Tokens("r", 0, [5], "x", logprobs=[Logprobs(TokenLogprob(5, 0.5))])   # encode does not check
    with pytest.raises(ProtocolError):
        p.decode_all(positive.encode())
    too_many = p.Tokens("r", 0, [5], "x", logprobs=[Logprobs(TokenLogprob(5, -1.0), [TokenLogprob(1, -1.0)] * 21)])
    with pytest.raises(ProtocolError):
        p.decode_all(too_many.encode())


def test_completion_offsets_count_characters_once_complete():
    e = lambda t, b, lp: Logprobs(TokenLogprob(t, lp, b), [TokenLogprob(t, lp, b)])   # noqa: E731
    r = ChoiceLogprobs(chat=False, echo="hé")
    prompt = [e(1, b"h", 0.0), e(2, b"\xc3", -1.0), e(3, b"\xa9", -0.5)]
    out = r.render([e(4, b" \xe2\x82", -0.1), e(5, b"\xac", -0.2)], prompt)
    assert out.text_offset == [0, 1, 1, 2, 3]          # é is one character; so is the euro sign
    assert out.token_logprobs == [None, -1.0, -0.5, -0.1, -0.2] and out.top_logprobs[0] is None
    assert out.tokens[:2] == ["h", "\ufffd"] and out.top_logprobs[3] == {" \ufffd": -0.1}
    chat = ChoiceLogprobs(chat=True).render([e(4, b"\xe2\x82\xac", -0.1)])
    assert chat.content[0].bytes == [0xE2, 0x82, 0xAC] and chat.content[0].token == "\u20ac"


def test_best_of_keeps_the_likeliest_and_usage_counts_the_prompt_once():
    class C:
        def __init__(self, lps, n):
            self.logprobs = [Logprobs(TokenLogprob(1, lp)) for lp in lps]
            self.usage = {"prompt_tokens": 10, "completion_tokens": n, "cached_tokens": 4}
    a, b, c = C([-1.0, -2.0], 2), C([-0.5], 1), C([-3.0], 1)
    assert best_of([a, b, c], 2) == [b, a]
    assert total_usage([a, b]) == {"prompt_tokens": 10, "cached_tokens": 4, "completion_tokens": 3}
    seeds = choice_seeds(7, 3)
    assert seeds[0] == 7 and len(set(seeds)) == 3 and all(0 <= s < 2**63 for s in seeds)
    assert choice_seeds(None, 2) == [None, None]


def test_the_broker_relays_logprobs_with_their_tokens_and_drops_a_repeat_with_them():
    from tests.test_broker_state import FakeClock, of, ready
    from broker.state import BrokerState
    st = BrokerState(clock=FakeClock())
    ready(st, b"ctx", "context")
    ready(st, b"gen", "generation")
    lp = lambda t: [Logprobs(TokenLogprob(t, -0.5, bytes([t])), [TokenLogprob(t, -0.5, bytes([t]))])]  # noqa: E731
    scored = [Logprobs(TokenLogprob(t, 0.0 if i == 0 else -1.0, bytes([t]))) for i, t in enumerate([1, 2, 3])]
    [pre] = of(st.on_client(b"c", p.Submit("r", prompt="hello", sampling={"logprobs": 1, "prompt_logprobs": 0})),
               p.Prefill)
    out = st.on_worker(b"ctx", p.ContextDone("r", pre.attempt, 7, "x", [1, 2, 3], {"t": "r"}, logprobs=lp(7),
                                             prompt_logprobs=scored))
    [first] = of(out, p.Tokens)
    [dec] = of(out, p.Decode)
    assert first.logprobs == lp(7) and first.prompt_logprobs == scored
    st.on_worker(b"gen", p.KvPulled("r", dec.attempt))
    [tok] = of(st.on_worker(b"gen", p.Tokens("r", 1, [8], "y", dec.attempt, logprobs=lp(8))), p.Tokens)
    assert tok.logprobs == lp(8) and tok.prompt_logprobs is None
    assert of(st.on_worker(b"gen", p.Tokens("r", 1, [8], "y", dec.attempt, logprobs=lp(8))), p.Tokens) == []
    [final] = of(st.on_worker(b"gen", p.Finished("r", dec.attempt, "length", index=2, token_ids=[9], text="z",
                                                 logprobs=lp(9))), p.Final)
    assert (final.index, final.token_ids, final.logprobs) == (2, [9], lp(9))


# ---------------------------------------------------------------------------------------------
# the engine, run directly: what every deployment must report

@pytest.fixture(scope="module")
def engine():
    model, tok = load_model("tiny", dtype="auto", device="cpu")     # as the worker loads it
    return model, tok


def reference(engine, prompt, n, k):
    """Greedy ids, and per output token the log-softmax of the logits it was picked from: its
    value and the top ``k`` (ids, values); and the prompt's (each token given those before)."""
    model, _ = engine
    runner = ModelRunner(model, KVCache(model.cfg, 16, 16))
    table = list(range(16))
    with torch.inference_mode():
        every = runner.prefill(prompt, table, every_position=True)
    lp_prompt = torch.log_softmax(every[:-1], -1).gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    logits, ids, out = every[-1], [], []
    for _ in range(n):
        lp = torch.log_softmax(logits, -1)
        t = int(lp.argmax())
        top = lp.topk(k)
        ids.append(t)
        out.append((lp[t].item(), top.indices.tolist(), top.values.tolist()))
        logits = runner.decode([t], [len(prompt) + len(ids) - 1], [table])[0]
    return ids, out, lp_prompt.tolist()


def assert_matches(got, ref, k):
    ids, want, _ = ref
    assert [e.token.token_id for e in got] == ids
    for e, (lp, top_ids, top_vals) in zip(got, want):
        assert abs(e.token.logprob - lp) < TOL
        assert [t.token_id for t in e.top] == top_ids[:k]
        assert [t.logprob for t in e.top] == pytest.approx(top_vals[:k], abs=TOL)
        assert e.token.text == bytes([e.token.token_id])        # the tiny model's tokens are bytes


@pytest.fixture(scope="module")
def agg():
    with Deployment(http=True) as d:
        # chunks of 4 and blocks of 4: a prompt's log-probabilities span chunks, and its blocks
        # are cached by the first request (which a request for them must not use)
        d.add_worker("both", "both0", options={"max_num_tokens": 4, "tokens_per_block": 4})
        yield d


@pytest.fixture(scope="module")
def disagg():
    with Deployment(http=True) as d:
        d.add_worker("context", "ctx0")
        d.add_worker("generation", "gen0")
        yield d


@pytest.mark.parametrize("mode", ["agg", "disagg"])
def test_greedy_logprobs_equal_the_engines_log_softmax(request, engine, mode):
    d = request.getfixturevalue(mode)
    ref = reference(engine, PROMPT, 8, 5)
    with Client(d.frontend, timeout=60) as c:
        plain = c.generate(token_ids=PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
        done = c.generate(token_ids=PROMPT, max_tokens=8, temperature=0, ignore_eos=True, logprobs=5,
                          prompt_logprobs=2)
        stream = c.stream(token_ids=PROMPT, max_tokens=8, temperature=0, ignore_eos=True, logprobs=5)
        streamed = list(stream)
    if mode == "agg":       # the prompt's blocks were cached, and only the request scoring them skipped them
        assert done.usage["cached_tokens"] == 0 and stream.completion.usage["cached_tokens"] == 8
    assert_matches(done.logprobs, ref, 5)
    assert [e for ch in streamed for e in ch.logprobs] == done.logprobs
    assert plain.logprobs is None and plain.token_ids == done.token_ids and plain.prompt_logprobs is None
    # the prompt's: one per prompt token, the first unscored; the same arithmetic
    assert [e.token.token_id for e in done.prompt_logprobs] == PROMPT
    assert [e.token.logprob for e in done.prompt_logprobs[1:]] == pytest.approx(ref[2], abs=TOL)
    assert all(len(e.top) == 2 for e in done.prompt_logprobs[1:])
    assert streamed[0].prompt_logprobs is None
    d.wait_idle()


def test_disaggregated_equals_aggregated_for_seeded_sampling(agg, disagg):
    sampling = dict(token_ids=PROMPT, max_tokens=12, temperature=0.9, top_k=40, seed=99, ignore_eos=True,
                    logprobs=3, prompt_logprobs=1)
    runs = []
    for d in (agg, disagg):
        with Client(d.frontend, timeout=60) as c:
            runs.append(c.generate(**sampling))
    a, b = runs
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logprobs + a.prompt_logprobs, b.logprobs + b.prompt_logprobs):
        assert x.token.token_id == y.token.token_id and abs(x.token.logprob - y.token.logprob) < TOL
        assert [t.token_id for t in x.top] == [t.token_id for t in y.top]


def test_a_first_token_that_ends_the_request_carries_its_logprobs(disagg):
    with Client(disagg.frontend, timeout=60) as c:
        done = c.generate(token_ids=PROMPT, max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=0)
    assert len(done.logprobs) == 1 and len(done.prompt_logprobs) == len(PROMPT)


def test_a_migrated_stream_delivers_every_logprob_once(engine):
    ref = reference(engine, PROMPT, 200, 2)
    with Deployment() as d:
        d.add_worker("context", "ctx")
        d.add_worker("generation", "gen1", options={"max_batch_size": 64})
        d.add_worker("generation", "gen2", options={"max_batch_size": 1})    # fewer credits: 2nd choice
        got, stopped = [], False
        with Client(d.frontend, timeout=120) as c:
            stream = c.stream(token_ids=PROMPT, max_tokens=200, temperature=0, ignore_eos=True, logprobs=2)
            for ch in stream:
                got.extend(ch.logprobs)
                if len(got) >= 5 and not stopped:
                    os.kill(d.workers["gen1"].pid, signal.SIGSTOP)     # then killed: the cut is here
                    stopped = True
                    d.kill("gen1")
        assert stopped and len(got) == 200
        assert_matches(got, ref, 2)
        assert d.wait_idle()["counters"]["migrated"] == 1


# ---------------------------------------------------------------------------------------------
# the openai SDK and Triton, through the gateway

def api(d):
    return openai.AsyncOpenAI(base_url=d.http + "/v1", api_key="x", max_retries=0, timeout=60)


async def test_openai_chat_logprobs_streamed_and_not_with_n(disagg):
    msgs = [{"role": "user", "content": "hi"}]
    with Client(disagg.frontend, timeout=60) as c:
        want = c.generate(messages=msgs, max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    async with api(disagg) as oa:
        r = await oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, n=2,
                                             logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
        chunks = [ch async for ch in await oa.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=6, temperature=0, n=2, logprobs=True, top_logprobs=3,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})]
        plain = await oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1]
    for choice in r.choices:
        assert choice.message.content == want.text
        content = choice.logprobs.content
        assert [x.logprob for x in content] == pytest.approx([e.token.logprob for e in want.logprobs], abs=1e-6)
        assert [x.bytes for x in content] == [list(e.token.text) for e in want.logprobs]
        assert all(len(x.top_logprobs) == 3 and x.top_logprobs[0].logprob >= x.logprob - 1e-6 for x in content)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.usage["prompt_tokens"], 12)
    for i in (0, 1):
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        lps = [x for ch in mine if ch.logprobs for x in ch.logprobs.content]
        assert [x.model_dump() for x in lps] == [x.model_dump() for x in r.choices[i].logprobs.content]
        assert "".join(ch.delta.content or "" for ch in mine) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert plain.choices[0].logprobs is None and len(plain.choices) == 1
    disagg.wait_idle()


async def test_openai_completions_logprobs_and_echo(disagg, engine):
    ref = reference(engine, list(b"hello"), 5, 4)
    async with api(disagg) as oa:
        r = await oa.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0, logprobs=4,
                                        extra_body={"ignore_eos": True})
        e = await oa.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0, logprobs=4,
                                        echo=True, extra_body={"ignore_eos": True})
        chunks = [ch async for ch in await oa.completions.create(
            model="tiny", prompt="hello", max_tokens=5, temperature=0, logprobs=4, echo=True, stream=True,
            extra_body={"ignore_eos": True})]
        bare = await oa.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0, echo=True,
                                           extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x[0] for x in ref[1]], abs=TOL)
    assert all(1 <= len(top) <= 5 and max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs,
                                                                                        lp.token_logprobs))
    assert lp.text_offset[0] == 0
    # echo: the prompt before the answer, its tokens listed first (the first unscored)
    text = e.choices[0].text
    assert text == "hello" + r.choices[0].text and bare.choices[0].text == text and bare.choices[0].logprobs is None
    el = e.choices[0].logprobs
    assert el.tokens[:5] == list("hello") and el.token_logprobs[0] is None and el.top_logprobs[0] is None
    assert el.token_logprobs[1:5] == pytest.approx(ref[2], abs=TOL)
    assert el.token_logprobs[5:] == lp.token_logprobs and el.text_offset[:6] == [0, 1, 2, 3, 4, 5]
    streamed = [x for ch in chunks for x in (ch.choices[0].logprobs.token_logprobs if ch.choices[0].logprobs else [])]
    assert streamed == el.token_logprobs
    assert "".join(ch.choices[0].text for ch in chunks) == text
    disagg.wait_idle()


async def test_openai_n_and_best_of_sample_as_the_derived_seeds_do(agg):
    async with api(agg) as oa:
        r = await oa.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=1.0, seed=5, n=3,
                                        extra_body={"ignore_eos": True})
        b = await oa.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=1.0, seed=5, n=1,
                                        best_of=3, extra_body={"ignore_eos": True})
    with Client(agg.frontend, timeout=60) as c:
        runs = [c.generate("abc", max_tokens=6, temperature=1.0, seed=s, ignore_eos=True, logprobs=0)
                for s in choice_seeds(5, 3)]
    assert [ch.text for ch in r.choices] == [x.text for x in runs]
    assert len({x.text for x in runs}) > 1                   # each choice its own sample
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 18)
    likeliest = max(runs, key=lambda x: sum(e.token.logprob for e in x.logprobs))
    assert [ch.text for ch in b.choices] == [likeliest.text] and b.choices[0].logprobs is None
    assert b.usage.completion_tokens == 6
    agg.wait_idle()


async def test_triton_return_log_probs_come_from_the_engine(disagg):
    from tests.test_gateway import post, sse_events
    with Client(disagg.frontend, timeout=60) as c:
        want = c.generate("abc", max_tokens=6, temperature=0, logprobs=0)
    lps = [e.token.logprob for e in want.logprobs]
    status, _, text = await post(disagg, "/v2/models/ensemble/generate",
                                 {"text_input": "abc", "max_tokens": 6, "return_log_probs": True})
    body = json.loads(text)
    assert status == 200 and body["output_log_probs"] == pytest.approx(lps, abs=1e-6)
    assert body["cum_log_probs"] == pytest.approx(sum(lps), abs=1e-5)
    status, _, text = await post(disagg, "/v2/models/ensemble/generate_stream",
                                 {"text_input": "abc", "max_tokens": 6, "return_log_probs": True, "stream": True})
    events = [json.loads(x) for x in sse_events(text)]
    assert [v for ev in events for v in ev["output_log_probs"]] == pytest.approx(lps, abs=1e-6)
    assert events[-1]["cum_log_probs"] == pytest.approx(sum(lps), abs=1e-5)
    tensors = [{"name": "text_input", "datatype": "BYTES", "shape": [2, 1], "data": ["abc", "abc"]},
               {"name": "max_tokens", "datatype": "INT32", "shape": [2, 1], "data": [6, 3]},
               {"name": "return_log_probs", "datatype": "BOOL", "shape": [2, 1], "data": [True, True]}]
    status, _, text = await post(disagg, "/v2/models/ensemble/infer", {"inputs": tensors})
    outs = {o["name"]: o for o in json.loads(text)["outputs"]}
    assert status == 200 and outs["output_log_probs"]["shape"] == [2, 1, 6]
    assert outs["output_log_probs"]["data"] == pytest.approx(lps + lps[:3] + [0.0] * 3, abs=1e-6)
    assert outs["cum_log_probs"]["data"] == pytest.approx([sum(lps), sum(lps[:3])], abs=1e-5)
    disagg.wait_idle()


async def test_two_requests_of_one_x_request_id_with_n_both_run(agg):
    from tests.test_gateway_extras import request
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 6, "ignore_eos": True, "n": 2, "seed": 3}
    for stream in (False, True):
        both = await asyncio.gather(*(request(agg, "POST", "/v1/completions", dict(body, stream=stream),
                                              {"X-Request-Id": "same"}) for _ in range(2)))
        assert [s for s, _, _ in both] == [200, 200], both
        assert all(h["X-Request-Id"] == "same" for _, h, _ in both)
    agg.wait_idle()
