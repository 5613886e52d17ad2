"""The HTTP gateway under junk (issue 13): hypothesis-fuzzed JSON bodies never get a 500, and
slow or half-open connections are closed within the read timeout, past the connection limit
refused with 503, while real requests go on being served."""
import asyncio
import json
import select
import socket

import aiohttp
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from client.gateway import Gateway, GatewayThread
from tests.harness import Deployment

pytestmark = pytest.mark.timeout(300)

READ_TIMEOUT = 1.0
MAX_CONNECTIONS = 200


@pytest.fixture(scope="module")
def gw():
    with Deployment() as d:
        d.add_worker("context", "ctx")
        d.add_worker("generation", "gen")
        t = GatewayThread(Gateway(d.frontend, port=0, models=("tiny",), request_timeout=20,
                                  read_timeout=READ_TIMEOUT, max_connections=MAX_CONNECTIONS))
        url = t.start()
        try:
            yield d, url
        finally:
            t.stop()


def post(url, path, raw: bytes, timeout=60):
    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.post(url + path, data=raw, headers={"Content-Type": "application/json"}) as r:
                return r.status, await r.text()
    return asyncio.run(go())


def ok_request(url):
    status, text = post(url, "/v1/completions", json.dumps(
        {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}).encode())
    assert status == 200, text
    assert json.loads(text)["usage"]["completion_tokens"] == 3


def _host_port(url):
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def _half_open(addr, n):
    socks = []
    for _ in range(n):
        s = socket.create_connection(addr, timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")   # half a head
        socks.append(s)
    return socks


def _first_bytes(s, timeout=30):
    """What the server sends before it closes (b"" for nothing), or None if it stays open."""
    s.settimeout(timeout)
    try:
        return s.recv(65536)[:12]
    except ConnectionResetError:
        return b""
    except socket.timeout:
        return None


def test_500_half_open_connections_are_all_closed_by_the_read_timeout(gw):
    d, url = gw
    socks = _half_open(_host_port(url), 500)     # past the limit too: refused or timed out alike
    try:
        heads = [_first_bytes(s) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert None not in heads, f"{heads.count(None)} half-open connections outlived the read timeout"
    assert set(heads) <= {b"", b"HTTP/1.1 503"}, set(heads)
    ok_request(url)


def test_connections_past_the_limit_are_refused_with_503(gw):
    d, url = gw
    patient = GatewayThread(Gateway(d.frontend, port=0, models=("tiny",), read_timeout=120,
                                    max_connections=MAX_CONNECTIONS))
    socks = _half_open(_host_port(patient.start()), MAX_CONNECTIONS + 50)
    try:
        excess = [_first_bytes(s) for s in socks[MAX_CONNECTIONS:]]
        readable, _, _ = select.select(socks[:MAX_CONNECTIONS], [], [], 0.5)
    finally:
        for s in socks:
            s.close()
        patient.stop()
    assert readable == []           # the first ones are held open, waiting for their heads
    assert excess == [b"HTTP/1.1 503"] * 50
    ok_request(url)


def test_a_body_that_trickles_in_gets_408(gw):
    d, url = gw
    s = socket.create_connection(_host_port(url), timeout=10)
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\":")
        s.settimeout(READ_TIMEOUT * 10)
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 408"), head[:200]
        assert b"request_timeout" in head
    finally:
        s.close()
    ok_request(url)


FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
          "stop", "stop_token_ids", "ignore_eos", "stream", "n", "logprobs", "repetition_penalty",
          "user", "metadata", "stream_options", "messages", "suffix", "echo", "best_of", "top_logprobs"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=False)
    | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@st.composite
def bodies(draw):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]}
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        body[key] = draw(json_values)
    raw = json.dumps(body)
    how = draw(st.sampled_from(["json", "json", "deep", "bigint", "raw"]))
    if how == "deep":
        depth = draw(st.integers(100, 5000))
        key = draw(st.sampled_from(FIELDS))
        raw = raw[:-1] + f', "{key}": ' + "[" * depth + "]" * depth + "}"
    elif how == "bigint":
        key = draw(st.sampled_from(["top_k", "stop_token_ids", "prompt", "max_tokens", "seed"]))
        big = str(draw(st.integers(2**63, 2**200)))
        raw = raw[:-1] + f', "{key}": ' + (f"[{big}]" if key in ("stop_token_ids", "prompt") else big) + "}"
    elif how == "raw":
        return draw(st.binary(max_size=64))
    return raw.encode()


def test_fuzzed_json_bodies_never_get_a_500(gw):
    d, url = gw
    seen = {}

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), bodies())
    def one(path, raw):
        status, text = post(url, path, raw)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500 or status in (503, 504), (status, text[:300], raw[:300])
        if status >= 400:
            err = json.loads(text)["error"]
            assert err["message"] and "type" in err

    one()
    assert seen.get(400, 0) > 50, seen
    ok_request(url)
    d.wait_idle(60)
