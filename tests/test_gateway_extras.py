"""The gateway's smaller doors: per-chunk usage (``stream_options.continuous_usage_stats``),
``X-Request-Id``, TensorRT-LLM's ``/perf_metrics`` and ``/version``, bad words (Triton's
``bad_words``, vLLM's ``bad_words``) and the Triton chat template rule; on real processes with
the tiny model (one context and one generation worker: the KV moves), and the pure parts alone."""
import asyncio
import json
import time

import aiohttp
import pytest
import torch
from aiohttp import web
from multidict import CIMultiDict

from broker import protocol as p
from broker.config import BrokerConfig, ConfigError, parse_disagg_config
from broker.protocol import SamplingParams
from broker.state import FRONT, BrokerState
from client import Client
from client.errors import RequestFailed
from client.gateway import Gateway
from client.perf_metrics import PerfMetrics
from client.request import Chunk, Completion
from client.triton_bls import bls_request, json_values
from tests.test_broker_state import FakeClock, context_done, of, ready, submit
from tests.test_gateway import dep, post, sse_events  # noqa: F401  (dep: the same deployment fixture)
from workers.engine.sampler import ban_tokens
from workers.engine.tokenizer import ByteTokenizer
from workers.sequence import FULL, Sequence

pytestmark = pytest.mark.timeout(180)

PROMPT = "abc"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
        "ignore_eos": True, "stream": True}


async def request(d, method, path, body=None, headers=None):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async with s.request(method, d.http + path, json=body, headers=headers) as r:
            return r.status, CIMultiDict(r.headers), await r.text()   # header names in any case


# -- per-chunk usage ------------------------------------------------------------------------------

@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT),
                                       ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 6,
                                                            "temperature": 0, "ignore_eos": True, "stream": True})])
async def test_continuous_usage_stats_puts_usage_on_every_chunk(dep, path, body):
    opts = {"include_usage": True, "continuous_usage_stats": True}
    status, _, text = await post(dep, path, {**body, "stream_options": opts})
    assert status == 200, text
    chunks = [json.loads(e) for e in sse_events(text)[:-1]]
    usages = [c["usage"] for c in chunks]
    final = usages[-1]
    assert chunks[-1]["choices"] == [] and final["completion_tokens"] == 6
    assert all(u["prompt_tokens"] == final["prompt_tokens"] > 0 for u in usages)       # known from the first
    done = [u["completion_tokens"] for u in usages]
    assert done == sorted(done) and done[0] >= 1 and all(u["total_tokens"] == u["prompt_tokens"] +
                                                          u["completion_tokens"] for u in usages)
    # the cached part of the prompt is known only at the end: the per-chunk usage does not claim
    # one (a repeat of the prompt hits the prefix cache; its early chunks said cached_tokens 0)
    status, _, text = await post(dep, path, {**body, "stream_options": opts})
    usages = [json.loads(e)["usage"] for e in sse_events(text)[:-1]]
    assert usages[-1]["prompt_tokens_details"]["cached_tokens"] >= 0
    assert not any("prompt_tokens_details" in u for u in usages[:-1]), usages
    # as vLLM: without include_usage, continuous_usage_stats adds nothing
    status, _, text = await post(dep, path, {**body, "stream_options": {"continuous_usage_stats": True}})
    assert status == 200 and not any("usage" in json.loads(e) for e in sse_events(text)[:-1])
    dep.wait_idle()


# -- X-Request-Id ---------------------------------------------------------------------------------

async def test_x_request_id_is_the_id_of_the_answer_and_comes_back(dep):
    rid = "trace-0af7651916cd43dd8448eb211c80319c"
    status, headers, text = await request(dep, "POST", "/v1/completions", {
        "model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0}, {"X-Request-Id": rid})
    assert status == 200 and headers["X-Request-Id"] == rid and json.loads(text)["id"] == f"cmpl-{rid}"
    status, headers, text = await request(dep, "POST", "/v1/chat/completions", CHAT, {"X-Request-Id": rid})
    chunks = [json.loads(e) for e in sse_events(text)[:-1]]
    assert status == 200 and headers["X-Request-Id"] == rid
    assert {c["id"] for c in chunks} == {f"chatcmpl-{rid}"}
    # the same id twice at once: both run (the broker's copy of the second gets a suffix)
    both = await asyncio.gather(*(request(dep, "POST", "/v1/completions", {
        "model": "tiny", "prompt": PROMPT, "max_tokens": 8, "ignore_eos": True}, {"X-Request-Id": "dup"})
        for _ in range(2)))
    assert [(s, json.loads(t)["id"]) for s, _, t in both] == [(200, "cmpl-dup")] * 2
    # none given: one is made, and shows in the answer's id
    status, headers, text = await request(dep, "POST", "/v1/completions", {"model": "tiny", "prompt": PROMPT,
                                                                           "max_tokens": 2})
    made = headers["X-Request-Id"]
    assert status == 200 and len(made) == 32 and json.loads(text)["id"] == f"cmpl-{made}"
    # Triton's routes and the others return it too
    status, headers, _ = await request(dep, "POST", "/v2/models/ensemble/generate",
                                       {"text_input": PROMPT, "max_tokens": 2}, {"X-Request-Id": rid})
    assert status == 200 and headers["X-Request-Id"] == rid
    assert (await request(dep, "GET", "/health", headers={"X-Request-Id": rid}))[1]["X-Request-Id"] == rid
    dep.wait_idle()


@pytest.mark.parametrize("bad", ["x" * 129, "has space", "semi;colon", "ünï"])
async def test_a_bad_x_request_id_is_a_400_naming_the_header(dep, bad):
    status, headers, text = await request(dep, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2},
                                          {"X-Request-Id": bad.encode().decode("latin-1")})
    err = json.loads(text)["error"]
    assert status == 400 and err["param"] == "X-Request-Id" and "X-Request-Id" in err["message"]
    assert "X-Request-Id" not in headers
    status, _, text = await request(dep, "POST", "/v2/models/ensemble/generate",
                                    {"text_input": PROMPT, "max_tokens": 2}, {"X-Request-Id": "a b"})
    assert status == 400 and "X-Request-Id" in json.loads(text)["error"]     # Triton's error shape


class HoldingClient:
    """A stand-in for the gateway's ``AsyncClient`` that holds every request until ``total`` are
    in flight at once, and refuses an id already in flight as the broker does."""

    def __init__(self, total):
        self.total, self.live, self.ids = total, set(), []
        self.full = asyncio.Event()

    def in_flight(self, rid):
        return rid in self.live

    def _take(self, rid):
        if rid in self.live:
            raise RequestFailed(p.Code.DUPLICATE_REQUEST, f"request id {rid!r} is already in flight")
        self.live.add(rid)
        self.ids.append(rid)
        if len(self.live) == self.total:
            self.full.set()

    async def _hold(self):
        await asyncio.wait_for(self.full.wait(), 10)

    async def generate(self, *, request_id, **kw):             # Triton's rows
        self._take(request_id)
        try:
            await self._hold()
        finally:
            self.live.discard(request_id)
        return Completion(request_id, "ok", [1], "stop")

    def stream(self, *, request_id, **kw):                      # OpenAI's choices
        self._take(request_id)
        return HeldStream(self, request_id)


class HeldStream:
    def __init__(self, client, rid):
        self.client, self.rid, self.completion = client, rid, None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.client.live.discard(self.rid)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.completion is not None:
            raise StopAsyncIteration
        await self.client._hold()
        self.completion = Completion(self.rid, "ok", [1], "stop")
        return Chunk(self.rid, 0, [1], "ok")


def infer_rows(n):
    return {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [n, 1], "data": [PROMPT] * n},
                       {"name": "max_tokens", "datatype": "INT32", "shape": [n, 1], "data": [[2]] * n}]}


@pytest.mark.parametrize("path,first,batch", [
    ("/v2/models/ensemble/generate", {"text_input": PROMPT, "max_tokens": 2}, infer_rows(2)),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, {"prompt": PROMPT, "max_tokens": 2, "n": 2})])
async def test_an_x_request_id_in_flight_never_collides_at_the_broker(path, first, batch):
    """The same X-Request-Id while in flight (a Triton batch's rows and OpenAI's choices go to the
    broker as ID-i; here ``same-1`` is one such id already in flight): every request runs, with
    distinct broker ids, and every answer shows the id it was given."""
    client = HoldingClient(total=5)
    gw = Gateway("tcp://127.0.0.1:9", triton_chat_template="off")     # off: no look at the workers
    gw.client = client
    runner = web.AppRunner(gw.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def send(rid, body):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            async with s.post(url + (path.replace("generate", "infer") if "inputs" in body else path),
                              json=body, headers={"X-Request-Id": rid}) as r:
                return r.status, r.headers["X-Request-Id"], await r.text()

    try:
        held = asyncio.ensure_future(send("same-1", first))
        for _ in range(300):                 # until it is in flight
            if client.live:
                break
            await asyncio.sleep(0.01)
        answers = await asyncio.gather(held, send("same", batch), send("same", batch))
    finally:
        await runner.cleanup()
    assert [(s, shown) for s, shown, _ in answers] == [(200, "same-1"), (200, "same"), (200, "same")], \
        (answers, client.ids)
    assert len(client.ids) == len(set(client.ids)) == 5, client.ids
    if path.startswith("/v1"):
        assert [json.loads(t)["id"] for _, _, t in answers] == ["cmpl-same-1", "cmpl-same", "cmpl-same"]
    # /perf_metrics shows the ids the client gave (a row's or choice's -i), never a broker suffix
    shown = sorted(e["request_id"] for e in gw.perf.drain())
    prefix = "triton" if "generate" in path else "cmpl"
    assert shown == sorted([f"{prefix}-same-1"] + [f"{prefix}-same-{i}" for i in (0, 1) for _ in range(2)]), shown


# -- /perf_metrics and /version -------------------------------------------------------------------

async def test_perf_metrics_report_each_finished_request_once_with_its_kv_transfer(dep):
    await request(dep, "GET", "/perf_metrics")                # drain what earlier tests left
    for rid in ("pm-1", "pm-2"):
        status, _, _ = await request(dep, "POST", "/v1/completions", {
            "model": "tiny", "prompt": PROMPT * 10, "max_tokens": 4, "ignore_eos": True}, {"X-Request-Id": rid})
        assert status == 200
    status, _, text = await request(dep, "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 3},
                                    {"X-Request-Id": "pm-3"})
    assert status == 200
    status, _, text = await request(dep, "GET", "/perf_metrics")
    got = {e["request_id"]: e for e in json.loads(text)}
    assert status == 200 and set(got) == {"cmpl-pm-1", "cmpl-pm-2", "chatcmpl-pm-3"}
    for e in got.values():
        ctx = e["ctx_perf_metrics"]["perf_metrics"]["timing_metrics"]
        gen = e["gen_perf_metrics"]["perf_metrics"]["timing_metrics"]
        assert e["ctx_perf_metrics"]["ctx_request_id"] == e["gen_perf_metrics"]["ctx_request_id"] == e["request_id"]
        assert gen["kv_cache_size"] > 0                                  # disaggregated: the KV moved
        assert e["disagg_server_arrival_time"] <= ctx["arrival_time"] <= ctx["first_scheduled_time"] \
            <= ctx["first_token_time"] <= gen["kv_cache_transfer_start"] <= gen["kv_cache_transfer_end"] \
            <= gen["last_token_time"]
        assert e["timings"]["kv_bytes"] == gen["kv_cache_size"]
    assert json.loads((await request(dep, "GET", "/perf_metrics"))[2]) == []     # drained on read
    status, _, text = await request(dep, "GET", "/version")
    assert status == 200 and json.loads(text)["version"]
    dep.wait_idle()


def test_perf_metrics_ring_is_bounded_and_zero_keeps_none():
    ring = PerfMetrics(2)
    for i in range(5):
        ring.add(f"r{i}", 1.0, 1.0, {"queue": 0.1, "total": 1.0})
    assert [e["request_id"] for e in ring.drain()] == ["r3", "r4"] and ring.drain() == []
    off = PerfMetrics(0)
    off.add("r", 1.0, 1.0, {})
    assert off.drain() == []
    with pytest.raises(ValueError, match="perf_metrics_max_requests=-1"):
        PerfMetrics(-1)


# -- bad words -------------------------------------------------------------------------------------

async def test_bad_words_change_the_greedy_answer_where_they_would_appear(dep):
    greedy = dict(max_tokens=16, temperature=0, ignore_eos=True)
    with Client(dep.frontend, timeout=60) as c:
        want = c.generate(PROMPT, **greedy).token_ids
        # the tiny model's bytes: ban the first ASCII letter it writes, and its first pair of
        # ASCII characters (one token each)
        k = next(i for i, t in enumerate(want) if t < 128 and chr(t).isalnum())
        k2 = next(i for i in range(len(want) - 1) if want[i] < 128 and want[i + 1] < 128)
        word, pair = chr(want[k]), chr(want[k2]) + chr(want[k2 + 1])
        one = c.generate(PROMPT, bad_words=[word], **greedy)
        two = c.generate(PROMPT, bad_words=[pair], **greedy)
    assert one.token_ids[:k] == want[:k] and want[k] not in one.token_ids
    # a two-token word: its last token is banned only right after its first
    assert two.token_ids[:k2 + 1] == want[:k2 + 1] and two.token_ids[k2 + 1] != want[k2 + 1]
    status, _, text = await post(dep, "/v2/models/ensemble/generate", {
        "text_input": PROMPT, "max_tokens": 16, "bad_words": f"{word},zz", "end_id": 10**6,
        "exclude_input_in_output": True})
    assert status == 200 and json.loads(text)["text_output"] == one.text
    status, _, text = await post(dep, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "bad_words": [pair],
                                                          **greedy})
    assert status == 200 and json.loads(text)["choices"][0]["text"] == two.text
    status, _, text = await post(dep, "/v1/completions", {"prompt": PROMPT, "bad_words": ["x"] * 17})
    assert status == 400 and json.loads(text)["error"]["param"] == "bad_words"
    dep.wait_idle()


def test_banned_tokens_follow_the_end_of_prompt_and_output():
    seq = Sequence("r", 0, FULL, [1, 2, 3], SamplingParams(), 10, bad_ids=((7,), (3, 8), (2, 3, 9), (5, 6, 4)))
    assert seq.banned() == [7, 8, 9]            # (3, 8) and (2, 3, 9) match the prompt's end
    seq.output_ids = [5]
    assert seq.banned() == [7]
    seq.output_ids = [5, 6]
    assert seq.banned() == [7, 4]               # its start in the output
    with torch.inference_mode():             # as the model's logits are
        logits = torch.zeros(2, 10)
    out = ban_tokens(logits, [[7, 4, 99], []])
    assert torch.isinf(out[0, [4, 7]]).all() and torch.isfinite(out[0, :4]).all() and torch.isfinite(out[1]).all()
    assert torch.isfinite(logits).all() and ban_tokens(logits, [[], [10]]) is logits


# -- the Triton chat template rule ------------------------------------------------------------------

def test_text_input_is_templated_unless_off_or_already_templated():
    req = bls_request(json_values({"text_input": "What is the capital of France?", "max_tokens": 4}))
    markers = ("<|im_start|>", "<|im_end|>")
    assert req.inputs(markers) == {"messages": [{"role": "user", "content": req.prompt}]}
    assert req.inputs(None) == {"prompt": req.prompt}                       # off, or no template
    assert req.inputs(()) == {"messages": [{"role": "user", "content": req.prompt}]}     # on
    templated = bls_request(json_values({"text_input": "<|im_start|>user\nHi<|im_end|>\n", "max_tokens": 4}))
    assert templated.inputs(markers) == {"prompt": templated.prompt}
    assert ByteTokenizer().chat_markers() == ()       # the tiny model ships no template: never templated


def test_the_config_sets_the_perf_metrics_ring_and_the_triton_template_rule():
    cfg = parse_disagg_config({"perf_metrics_max_requests": 0, "triton_chat_template": "off"})
    assert (cfg.perf_metrics_max_requests, cfg.triton_chat_template) == (0, "off")   # TensorRT-LLM's 0: none
    assert (parse_disagg_config({}).perf_metrics_max_requests, parse_disagg_config({}).triton_chat_template) \
        == (1000, "auto")
    with pytest.raises(ConfigError, match="triton_chat_template"):
        parse_disagg_config({"triton_chat_template": "sometimes"})
    with pytest.raises(ConfigError, match="perf_metrics_max_requests"):
        parse_disagg_config({"perf_metrics_max_requests": -1})


# -- what the broker relays for them --------------------------------------------------------------

def test_the_broker_relays_prompt_tokens_first_kv_bytes_at_the_end_and_chat_markers_in_its_stats():
    st = BrokerState(BrokerConfig(), FakeClock())
    ready(st, b"ctx", "context")
    st.on_worker(b"gen", p.Ready("gen", "generation", "tiny", 4, 100, {"backend": "ZMQ"}, 1, 1000,
                                 ["<|im_start|>", "<|im_end|>"]))
    stats = st.stats()
    assert [w["chat_markers"] for w in stats["workers"]] == [[], ["<|im_start|>", "<|im_end|>"]]
    assert stats["default_model"] == "tiny"
    [pre] = of(submit(st), p.Prefill)
    out = context_done(st, b"ctx", pre)                       # three prompt tokens
    [first] = of(out, p.Tokens, FRONT)
    [dec] = of(out, p.Decode)
    assert first.prompt_tokens == 3
    st.on_worker(b"gen", p.KvPulled("r1", dec.attempt, 0.002, 4096))
    [more] = of(st.on_worker(b"gen", p.Tokens("r1", 1, [8], "y", dec.attempt)), p.Tokens, FRONT)
    assert more.prompt_tokens == 0 and b"prompt_tokens" not in more.encode()[0]    # off the wire
    [fin] = of(st.on_worker(b"gen", p.Finished("r1", dec.attempt, "stop", 3)), p.Final, FRONT)
    assert fin.timings["kv_bytes"] == 4096
    # a `both` worker counts the prompt on its first tokens, and the broker passes it on
    ready(st, b"both", "both")
    st.on_worker(b"ctx", p.Disconnect())
    [gen] = of(submit(st, "r2"), p.Generate)
    [tok] = of(st.on_worker(b"both", p.Tokens("r2", 0, [5], "z", gen.attempt, 11)), p.Tokens, FRONT)
    assert tok.prompt_tokens == 11


def test_smollm2_announces_the_chatml_markers_its_template_writes():
    from workers.engine.tokenizer_export import load_tokenizer
    tok, _ = load_tokenizer("smollm2-135m")
    assert tok.chat_markers() == ("<|im_start|>", "<|im_end|>")
    tok.chat_template = None                  # a base model: nothing to template with
    assert tok.chat_markers() == ()


# -- an etcd:// broker ----------------------------------------------------------------------------

async def test_an_etcd_broker_is_looked_up_once_off_the_event_loop(monkeypatch):
    """The gateway's client finds the broker in etcd (blocking HTTP, up to discovery_timeout):
    once, in a thread, so the loop goes on meanwhile; none there is a clear BrokerUnavailable."""
    import client.request
    from client.errors import BrokerUnavailable
    asked, found = [], ["tcp://127.0.0.1:9"]

    def find_broker(uri, cluster, which, timeout):
        asked.append((uri, cluster, which, timeout))
        time.sleep(0.3)                  # etcd answering slowly: the loop must not wait on it
        if not found:
            raise LookupError(f"no broker of cluster {cluster!r} in etcd {uri} within {timeout:g} s")
        return found[0]
    monkeypatch.setattr(client.request, "find_broker", find_broker)

    async def ticks(n):
        for _ in range(n):
            await asyncio.sleep(0.01)

    for found_one in (True, False):
        found[:] = ["tcp://127.0.0.1:9"] if found_one else []
        asked.clear()
        gw = Gateway("etcd://127.0.0.1:2379", port=0, cluster_name="c1", discovery_timeout=7)
        ticker = asyncio.ensure_future(ticks(10))       # 0.1 s of ticks: done within the 0.3 s lookup
        try:
            if found_one:
                await gw.start()
                assert gw.client.address == "tcp://127.0.0.1:9"
            else:
                with pytest.raises(BrokerUnavailable, match="no broker of cluster 'c1' in etcd"):
                    await gw.start()
            assert ticker.done(), "the event loop waited on etcd"
        finally:
            ticker.cancel()
            await gw.close()
        assert asked == [("etcd://127.0.0.1:2379", "c1", "frontend", 7)]


async def test_a_start_cancelled_during_the_etcd_lookup_leaves_no_client_open(monkeypatch):
    """The client is made in a thread; a start() cancelled meanwhile (shutdown during a slow
    lookup) must not leave the client that thread goes on to make open: close() closes it."""
    import client.gateway
    import client.request
    made = []

    class Recorded(client.gateway.AsyncClient):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def find_broker(uri, cluster, which, timeout):
        time.sleep(0.3)
        return "tcp://127.0.0.1:9"
    monkeypatch.setattr(client.request, "find_broker", find_broker)
    monkeypatch.setattr(client.gateway, "AsyncClient", Recorded)
    gw = Gateway("etcd://127.0.0.1:2379", port=0, cluster_name="c1", discovery_timeout=7)
    starting = asyncio.ensure_future(gw.start())
    await asyncio.sleep(0.05)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert not made                  # still looking up
    await gw.close()
    assert len(made) == 1 and made[0].closed and gw.client is None
