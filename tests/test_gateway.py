"""The OpenAI-compatible HTTP gateway on real processes with the tiny model."""
import asyncio
import json
import time

import aiohttp
import openai
import pytest

from client import AsyncClient, Client
from tests.harness import Deployment
from tests.test_metrics import parse

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def dep():
    with Deployment(http=True) as d:
        d.add_worker("context", "ctx0")
        d.add_worker("generation", "gen0")
        yield d


def api(d, **kw):
    return openai.AsyncOpenAI(base_url=d.http + "/v1", api_key="x", max_retries=0, timeout=60, **kw)


async def post(d, path, body=None, raw=None, headers=None):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        data = raw if raw is not None else json.dumps(body).encode()
        async with s.post(d.http + path, data=data,
                          headers=headers or {"Content-Type": "application/json"}) as r:
            return r.status, dict(r.headers), await r.text()


async def get(d, path):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        async with s.get(d.http + path) as r:
            return r.status, dict(r.headers), await r.text()


def sse_events(text):
    """The data payloads of a server-sent-events body, in order."""
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


async def test_completions_match_the_python_client_token_for_token(dep):
    ids = [5, 17, 99, 3, 42, 7, 7, 120]
    with Client(dep.frontend, timeout=60) as c:
        want = c.generate(token_ids=ids, max_tokens=10, ignore_eos=True)
    async with api(dep) as oa:
        r = await oa.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (8, 10, 18)
        assert r.object == "text_completion" and r.model == "tiny"
        chunks = [ch async for ch in await oa.completions.create(
            model="tiny", prompt=ids, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})]
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    dep.wait_idle()


async def test_stream_shape_every_chunk_has_choices_and_ends_with_done(dep):
    status, headers, text = await post(dep, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
        "temperature": 0, "ignore_eos": True, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(ch["object"] == "chat.completion.chunk" and "delta" in ch["choices"][0] for ch in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len({ch["id"] for ch in chunks}) == 1
    status, _, text = await post(dep, "/v1/completions", {
        "model": "tiny", "prompt": "abc", "max_tokens": 4, "stream": True})
    events = sse_events(text)
    assert events[-1] == "[DONE]" and all("text" in json.loads(e)["choices"][0] for e in events[:-1])
    dep.wait_idle()


async def test_chat_stop_string_and_models(dep):
    async with api(dep) as oa:
        full = await oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "abc"}],
                                                max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
        text = full.choices[0].message.content
        assert full.choices[0].message.role == "assistant" and len(text) > 4
        cut = await oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "abc"}],
                                               max_completion_tokens=20, temperature=0, stop=[text[2:4]],
                                               extra_body={"ignore_eos": True})
        assert cut.choices[0].finish_reason == "stop" and text.startswith(cut.choices[0].message.content)
        models = await oa.models.list()
        assert [m.id for m in models.data] == ["tiny"]
    dep.wait_idle()


async def test_32_concurrent_requests_all_succeed(dep):
    async with api(dep) as oa:
        async def one(i):
            if i % 4 == 0:
                r = await oa.completions.create(model="tiny", prompt=[i + 1] * (1 + i), max_tokens=8,
                                                extra_body={"ignore_eos": True})
                return r.usage.completion_tokens
            if i % 4 == 1:
                r = await oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"q{i}"}],
                                                     max_tokens=8, extra_body={"ignore_eos": True})
                return r.usage.completion_tokens
            s = await oa.completions.create(model="tiny", prompt=f"prompt {i}", max_tokens=8, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
            return [ch async for ch in s][-1].usage.completion_tokens
        counts = await asyncio.gather(*(one(i) for i in range(32)))
    assert counts == [8] * 32
    dep.wait_idle()


BAD = [
    ("/v1/completions", b'{"model": "tiny", "prompt": ', None, 400, "not valid JSON"),
    ("/v1/completions", b'[1, 2]', None, 400, "JSON object"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -5}, "max_tokens", 400, "-5"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "5"}, "max_tokens", 400, "integer"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, "temperature", 400, "hot"),
    ("/v1/completions", {"model": "tiny", "prompt": 5}, "prompt", 400, "prompt"),
    ("/v1/completions", {"model": "tiny"}, "prompt", 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": "yes"}, "stream", 400, "stream"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 17}, "n", 400, "n=17"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 3, "best_of": 2}, "best_of", 400,
     "best_of=2 must be at least n=3"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "best_of": 2, "stream": True}, "best_of", 400,
     "cannot stream"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 21}, "logprobs", 400, "logprobs=21"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2], "echo": True}, "echo", 400, "text prompt"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, "top_logprobs", 400, "top_logprobs=2 needs logprobs=true"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "echo": True}, "echo", 400, "echo=true is not supported"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 7}, "top_p", 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "min_p": 1.5}, "min_p", 400, "min_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [""]}, "stop", 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty", 400,
     "2"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"65": 101}}, "logit_bias.65", 400, "100"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"999": 5}}, "prompt", 400,
     "logit_bias token id 999 is outside the vocabulary [0, 258)"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "bogus": 1}, "bogus", 400, "bogus"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 99999]}, "prompt", 400, "99999"),
    # prompt + max_tokens beyond the context: refused at once (OpenAI's param is the prompt), not
    # clipped into a run of thousands of tokens the caller did not ask for
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2], "max_tokens": 100000}, "prompt", 400,
     "max_tokens=100000 with a prompt of 2 tokens needs 100002 tokens, beyond the model's context "
     "(max_seq_len) of 4096: ask for at most 4094"),
    ("/v1/completions", {"model": 7, "prompt": "x"}, "model", 400, "model"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, "model", 404, "gpt-9"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, "messages", 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
     "messages[0].role", 400, "robot"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 3}]},
     "messages[0].content", 400, "content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, "max_completion_tokens", 400, "0"),
]


@pytest.mark.parametrize("path,body,param,status,needle", BAD)
async def test_bad_input_gets_a_clear_openai_error(dep, path, body, param, status, needle):
    raw = body if isinstance(body, bytes) else None
    got, _, text = await post(dep, path, None if raw else body, raw=raw)
    assert got == status, text
    err = json.loads(text)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and needle in err["message"], err


# junk that must be a 400 naming the field, never a 500
JUNK = [
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2**70}, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2**70]}, "prompt", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop_token_ids": [3, 2**64]}, "stop_token_ids[1]",
     "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": -2**65}, "top_k", "invalid_value"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "temperature", "invalid_value"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "top_p": 1e999}', "top_p", "invalid_value"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", None, "invalid_json"),
    ("/v1/completions", b"[" * 200_000, None, "invalid_json"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": 1}},
     "stream_options.include_usage", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}, 7]},
     "messages[1]", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x", "tool_calls": [1]}]},
     "messages[0].tool_calls", "unsupported_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x", "colour": 1}]},
     "messages[0].colour", "unknown_field"),
]


@pytest.mark.parametrize("path,body,param,code", JUNK)
async def test_junk_is_a_400_naming_the_field_path(dep, path, body, param, code):
    raw = body if isinstance(body, bytes) else None
    got, _, text = await post(dep, path, None if raw else body, raw=raw)
    assert got == 400, text
    err = json.loads(text)["error"]
    assert (err["param"], err["code"]) == (param, code), err
    if param:
        assert param in err["message"], err


def test_request_models_apply_openais_defaults_and_normalise():
    from client.openai_models import ChatCompletionRequest, CompletionRequest, parse_request
    r = parse_request(CompletionRequest, {"prompt": ["hi"], "top_k": -1, "seed": -1, "stop": "x", "stream": None})
    assert r.inputs() == {"prompt": "hi"} and not r.stream and not r.include_usage
    assert r.sampling(16) == {"default_max_tokens": 16, "temperature": 1.0, "top_k": 0, "seed": 2**63 - 1, "stop": ["x"]}
    assert parse_request(CompletionRequest, {"prompt": "hi", "min_p": 0.1}).sampling(16)["min_p"] == 0.1
    c = parse_request(ChatCompletionRequest, {
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                     {"role": "assistant", "content": None, "refusal": None}],
        "max_tokens": 3, "max_completion_tokens": 5, "stream": True, "stream_options": {"include_usage": True}})
    assert c.inputs() == {"messages": [{"role": "system", "content": "ab"}, {"role": "assistant", "content": ""}]}
    assert c.sampling(256)["max_tokens"] == 5 and c.stream and c.include_usage


async def test_oversized_body_413_unknown_route_404_and_still_serving(dep):
    big = json.dumps({"model": "tiny", "prompt": "x" * (5 * 1024 * 1024)}).encode()
    status, _, text = await post(dep, "/v1/completions", raw=big)
    assert status == 413 and "limit" in json.loads(text)["error"]["message"]
    status, _, text = await get(dep, "/v1/nothing")
    assert status == 404 and json.loads(text)["error"]["code"] == "not_found"
    status, _, text = await get(dep, "/v1/completions")
    assert status == 405
    async with api(dep) as oa:
        with pytest.raises(openai.BadRequestError) as e:
            await oa.completions.create(model="tiny", prompt="x", max_tokens=-1)
        assert "max_tokens" in str(e.value)
        r = await oa.completions.create(model="tiny", prompt="still serving", max_tokens=3)
        assert r.usage.completion_tokens == 3
    dep.wait_idle()


async def test_client_disconnect_mid_stream_cancels_at_the_broker(dep):
    before = dep.stats()["counters"]["cancelled"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async with s.post(dep.http + "/v1/completions", json={
                "model": "tiny", "prompt": [3] * 20, "max_tokens": 4000, "ignore_eos": True,
                "stream": True}) as r:
            assert r.status == 200
            seen = 0
            async for line in r.content:
                if line.startswith(b"data: "):
                    seen += 1
                    if seen == 3:
                        break
            r.connection.transport.abort()     # vanish without reading the rest
    s = dep.wait_idle()
    assert s["counters"]["cancelled"] == before + 1


async def test_metrics_parse_and_move_with_requests(dep):
    status, headers, text = await get(dep, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    m0 = parse(text)
    async with api(dep) as oa:
        await oa.completions.create(model="tiny", prompt=[9] * 40, max_tokens=5, extra_body={"ignore_eos": True})
    dep.wait_idle()
    m1 = parse((await get(dep, "/metrics"))[2])
    fin = ("disagg_requests_total", (("outcome", "finished"),))
    assert m1[fin] == m0[fin] + 1
    for name in ("disagg_time_to_first_token_seconds_count", "disagg_e2e_request_latency_seconds_count",
                 "disagg_time_per_output_token_seconds_count"):
        assert m1[(name, ())] == m0.get((name, ()), 0) + 1, name
    kv = {k: v for k, v in m1.items() if k[0] == "disagg_kv_transfer_bytes_count"}
    assert kv and sum(kv.values()) == sum(v for k, v in m0.items() if k[0] == "disagg_kv_transfer_bytes_count") + 1
    assert sum(v for k, v in m1.items() if k[0] == "disagg_kv_transfer_bytes_sum") > 0
    assert m1[("disagg_workers", (("role", "context"), ("state", "idle")))] == 1
    assert m1[("disagg_kv_blocks_free", (("worker", "gen0"), ("role", "generation")))] > 0
    assert m1[("disagg_queue_depth", (("queue", "prefill"),))] == 0


async def test_health_flips_when_a_worker_dies_and_back_and_503_without_workers():
    with Deployment(http=True, heartbeat_s=0.1, liveness=5) as d:
        status, headers, text = await get(d, "/health")
        assert status == 503 and headers.get("Retry-After") and "context workers up 0" in text
        status, headers, text = await post(d, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 503 and headers.get("Retry-After") == "1"
        assert json.loads(text)["error"]["code"] == "no_workers"
        d.add_worker("context", "ctx", options={"heartbeat_ms": 100})
        d.add_worker("generation", "gen", options={"heartbeat_ms": 100})
        assert (await get(d, "/health"))[0] == 200
        d.kill("gen")                                          # SIGKILL
        deadline = time.monotonic() + 30
        while (await get(d, "/health"))[0] != 503:
            assert time.monotonic() < deadline, "health never turned 503 after the worker died"
            await asyncio.sleep(0.05)
        d.add_worker("generation", "gen2", options={"heartbeat_ms": 100})
        status, _, text = await get(d, "/health")
        assert status == 200 and json.loads(text)["workers"] == {"context": 1, "generation": 1, "both": 0}
        m = parse((await get(d, "/metrics"))[2])
        assert m[("disagg_worker_expirations_total", (("role", "generation"),))] == 1
        assert (await post(d, "/v1/completions", {"prompt": "x", "max_tokens": 2}))[0] == 200
        d.wait_idle()


async def test_penalties_logit_bias_and_min_tokens_reach_the_engine(dep):
    body = {"model": "tiny", "prompt": [3] * 6, "max_tokens": 6, "temperature": 0}
    _, _, plain = await post(dep, "/v1/completions", body)
    status, _, text = await post(dep, "/v1/completions", {**body, "logit_bias": {"65": 100}})
    assert status == 200 and json.loads(text)["choices"][0]["text"] == "A" * 6
    # the Python client with the same settings gets the same tokens: the gateway maps them as given
    sampling = {"presence_penalty": 1.5, "frequency_penalty": 0.5, "min_tokens": 4}
    status, _, text = await post(dep, "/v1/completions", {**body, **sampling})
    assert status == 200
    async with AsyncClient(dep.frontend, timeout=60) as c:
        direct = await c.generate(token_ids=[3] * 6, max_tokens=6, temperature=0.0, **sampling)
    assert json.loads(text)["choices"][0]["text"] == direct.text
