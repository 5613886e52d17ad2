"""Triton's KServe v2 API on the gateway (client/triton.py): generate, generate_stream, infer
(through tritonclient.http), health and metadata, the BLS model aliases, refusals of inputs the
engine cannot honour, and the nv_trt_llm_* metric families; on real processes with the tiny model."""
import asyncio
import json
import struct

import aiohttp
import numpy as np
import pytest
import tritonclient.http as triton
from multidict import CIMultiDict
from tritonclient.utils import InferenceServerException

from client import Client
from client.kserve import Tensor, TensorError, encode_infer_response, parse_infer_request
from client.triton_bls import bls_request, json_values
from client.openai_models import HttpError
from tests.harness import Deployment
from tests.test_gateway import dep, get, post, sse_events  # noqa: F401  (dep: the same deployment fixture)
from tests.test_metrics import parse

pytestmark = pytest.mark.timeout(180)

PROMPT = "abc"


@pytest.fixture(scope="module")
def want(dep):
    """The greedy answer to PROMPT from the Python client: what every Triton route must return."""
    with Client(dep.frontend, timeout=60) as c:
        return c.generate(PROMPT, max_tokens=8, temperature=0)


def host(d):
    return d.http.removeprefix("http://")


async def test_generate_returns_the_prompt_and_answer_as_text_output(dep, want):
    status, headers, text = await post(dep, "/v2/models/ensemble/generate", {
        "text_input": PROMPT, "max_tokens": 8, "bad_words": "", "stop_words": ""})
    assert status == 200, text
    body = json.loads(text)
    assert body["text_output"] == PROMPT + want.text
    assert (body["model_name"], body["model_version"]) == ("ensemble", "1")
    assert body["cum_log_probs"] == 0.0 and body["output_log_probs"] == [0.0] * len(want.token_ids)
    status, _, text = await post(dep, "/v2/models/ensemble/generate", {
        "text_input": PROMPT, "max_tokens": 8, "exclude_input_in_output": True})
    assert json.loads(text)["text_output"] == want.text
    dep.wait_idle()


async def test_generate_stream_streams_the_same_text_without_done(dep, want):
    status, headers, text = await post(dep, "/v2/models/ensemble/generate_stream", {
        "text_input": PROMPT, "max_tokens": 8, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [json.loads(e) for e in sse_events(text)]      # a [DONE] would not parse
    assert len(events) >= 2 and all(e["model_name"] == "ensemble" for e in events)
    assert "".join(e["text_output"] for e in events) == want.text           # never the prompt
    assert sum(len(e["output_log_probs"]) for e in events) == len(want.token_ids)
    # without `stream`, as the BLS: one response holding the whole text
    status, _, text = await post(dep, "/v2/models/tensorrt_llm_bls/generate_stream", {
        "text_input": PROMPT, "max_tokens": 8})
    events = [json.loads(e) for e in sse_events(text)]
    assert status == 200 and [e["text_output"] for e in events] == [PROMPT + want.text]
    dep.wait_idle()


@pytest.mark.parametrize("path", ["/v2/models/ensemble", "/v2/models/tensorrt_llm_bls",
                                  "/v2/models/disaggregated_serving_bls", "/v2/models/tiny",
                                  "/v2/models/ensemble/versions/1"])
async def test_every_alias_serves_the_default_model(dep, want, path):
    status, _, text = await post(dep, path + "/generate", {"text_input": PROMPT, "max_tokens": 8})
    assert status == 200 and json.loads(text)["text_output"] == PROMPT + want.text, text
    status, _, text = await get(dep, path)
    meta = json.loads(text)
    assert status == 200 and meta["name"] == path.split("/")[3] and meta["versions"] == ["1"]
    assert {i["name"] for i in meta["inputs"]} >= {"text_input", "max_tokens", "bad_words", "stop_words", "stream"}
    assert [o["name"] for o in meta["outputs"]] == ["text_output", "cum_log_probs", "output_log_probs"]
    assert (await get(dep, path + "/ready"))[0] == 200
    dep.wait_idle()


async def test_unknown_model_or_version_is_a_404_naming_what_exists(dep):
    status, _, text = await post(dep, "/v2/models/llama/generate", {"text_input": PROMPT, "max_tokens": 2})
    assert status == 404
    msg = json.loads(text)["error"]
    assert "'llama'" in msg and "ensemble" in msg and "disaggregated_serving_bls" in msg and "tiny" in msg
    status, _, text = await get(dep, "/v2/models/ensemble/versions/2")
    assert status == 404 and "version '2'" in json.loads(text)["error"]
    assert (await get(dep, "/v2/models/llama/ready"))[0] == 404


async def test_health_and_server_metadata(dep):
    assert (await get(dep, "/v2/health/live"))[0] == 200
    assert (await get(dep, "/v2/health/ready"))[0] == 200
    status, _, text = await get(dep, "/v2")
    assert status == 200 and "generate" in json.loads(text)["extensions"]
    status, _, text = await get(dep, "/v2/models/ensemble/config")
    cfg = json.loads(text)
    assert status == 200 and cfg["max_batch_size"] > 0
    assert {i["name"]: i["data_type"] for i in cfg["input"]}["text_input"] == "TYPE_STRING"


async def test_ready_is_503_and_generate_fails_clearly_without_workers():
    with Deployment(http=True) as d:
        assert (await get(d, "/v2/health/live"))[0] == 200
        status, _, text = await get(d, "/v2/health/ready")
        assert status == 503 and "context workers up 0" in json.loads(text)["error"]
        status, headers, text = await post(d, "/v2/models/ensemble/generate", {"text_input": "x", "max_tokens": 2})
        assert status == 503 and headers.get("Retry-After") and json.loads(text)["error"]


REFUSED = [
    ({"presence_penalty": 2.5}, "presence_penalty=2.5"),
    ({"frequency_penalty": -3.0}, "frequency_penalty=-3.0"),
    ({"min_length": -1}, "min_length=-1"),
    ({"return_generation_logits": True}, "return_generation_logits=true"),
    ({"beam_width": 2}, "beam_width=2"),
    ({"bad_words": "x" * 200}, "bad_words"),
    ({"bad_words": ",".join("w%d" % i for i in range(17))}, "bad_words holds 17 words"),
    ({"stream": True}, "generate_stream"),
    ({"top_k": -1}, "top_k=-1"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": "8"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens=0"),
    ({"max_tokens": 2**40}, "max_tokens"),
    ({"end_id": -3}, "end_id=-3"),
    ({"embedding_bias_words": "x"}, "embedding_bias_words"),
    ({"parameters": {"top_k": 3}}, "parameters"),
    ({"text_input": ""}, "text_input"),
    ({"text_input": None}, "text_input"),
]


@pytest.mark.parametrize("extra,needle", REFUSED)
async def test_inputs_the_engine_cannot_honour_are_refused_naming_them(dep, extra, needle):
    status, _, text = await post(dep, "/v2/models/ensemble/generate", {"text_input": PROMPT, "max_tokens": 2, **extra})
    assert status == 400, text
    assert needle in json.loads(text)["error"]


async def test_missing_input_and_neutral_values(dep, want):
    status, _, text = await post(dep, "/v2/models/ensemble/generate", {"text_input": PROMPT})
    assert status == 400 and "max_tokens" in json.loads(text)["error"]
    status, _, text = await post(dep, "/v2/models/ensemble/generate", {
        "text_input": PROMPT, "max_tokens": 8, "presence_penalty": 0, "frequency_penalty": 0.0, "min_length": 1,
        "return_log_probs": False, "beam_width": 1, "bad_words": ["", ""], "stop_words": "", "pad_id": 2,
        "length_penalty": 1.0, "repetition_penalty": 1.0, "top_k": 1, "temperature": 0.7, "random_seed": 2**64 - 1})
    assert status == 200 and json.loads(text)["text_output"] == PROMPT + want.text, text
    dep.wait_idle()


async def test_stop_words_and_end_id_stop_as_the_python_client_does(dep):
    with Client(dep.frontend, timeout=60) as c:
        full = c.generate(PROMPT, max_tokens=12, temperature=0, ignore_eos=True)
        end = full.token_ids[4]
        by_id = c.generate(PROMPT, max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[end])
        stop = full.text[3:5]
        by_word = c.generate(PROMPT, max_tokens=12, temperature=0, ignore_eos=True, stop=[stop, "zzz"])
    status, _, text = await post(dep, "/v2/models/ensemble/generate", {
        "text_input": PROMPT, "max_tokens": 12, "end_id": end, "exclude_input_in_output": True})
    assert status == 200 and json.loads(text)["text_output"] == by_id.text and len(by_id.token_ids) <= 5
    csv_words = '"' + stop.replace('"', '""') + '",zzz,'          # CSV quoting, an empty word dropped
    status, _, text = await post(dep, "/v2/models/ensemble/generate", {
        "text_input": PROMPT, "max_tokens": 12, "end_id": 10**6 + 1, "stop_words": csv_words,
        "exclude_input_in_output": True})
    assert status == 200 and json.loads(text)["text_output"] == by_word.text, text
    dep.wait_idle()


def test_tritonclient_http_infer_binary_and_json_batch(dep, want):
    c = triton.InferenceServerClient(host(dep), network_timeout=60.0)
    try:
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("ensemble")
        assert c.get_model_metadata("tensorrt_llm_bls")["platform"] == "python"

        def inputs(texts, max_tokens, binary):
            b = len(texts)
            spec = [("text_input", np.array([[t.encode()] for t in texts], dtype=object), "BYTES"),
                    ("max_tokens", np.full((b, 1), max_tokens, dtype=np.int32), "INT32"),
                    ("bad_words", np.array([[b""]] * b, dtype=object), "BYTES"),
                    ("stop_words", np.array([[b""]] * b, dtype=object), "BYTES")]
            out = []
            for name, arr, dt in spec:
                i = triton.InferInput(name, list(arr.shape), dt)
                i.set_data_from_numpy(arr, binary_data=binary)
                out.append(i)
            return out

        r = c.infer("ensemble", inputs([PROMPT], 8, True))     # binary in, binary out (the client's default)
        assert r.as_numpy("text_output")[0][0].decode() == PROMPT + want.text
        assert r.as_numpy("cum_log_probs").shape == (1, 1)
        r = c.infer("ensemble", inputs([PROMPT, PROMPT], 8, False), request_id="batch-1",
                    outputs=[triton.InferRequestedOutput("text_output", binary_data=False)])
        assert [t for t in r.get_response()["outputs"][0]["data"]] == [PROMPT + want.text] * 2
        assert r.get_response()["id"] == "batch-1" and len(r.get_response()["outputs"]) == 1
        with pytest.raises(InferenceServerException, match="presence_penalty"):
            i = triton.InferInput("presence_penalty", [1, 1], "FP32")
            i.set_data_from_numpy(np.array([[2.5]], dtype=np.float32))
            c.infer("ensemble", inputs([PROMPT], 2, True) + [i])
    finally:
        c.close()
    dep.wait_idle()


async def test_nv_trt_llm_metric_families_parse_with_their_label_sets(dep):
    async with aiohttp.ClientSession() as s:
        async with s.get(dep.http + "/metrics") as r:
            text = await r.text()
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(text)}
    labels = {"nv_trt_llm_request_metrics": "request_type", "nv_trt_llm_kv_cache_block_metrics": "kv_cache_block_type",
              "nv_trt_llm_inflight_batcher_metrics": "inflight_batcher_specific_metric",
              "nv_trt_llm_general_metrics": "general_type",
              "nv_trt_llm_disaggregated_serving_metrics": "disaggregated_serving_type"}
    for name, label in labels.items():
        assert families[name].samples, name
        assert all(set(s.labels) == {"model", "version", label} for s in families[name].samples), name
    assert "disagg_requests" in families                        # ours are still there
    m0 = parse(text)
    blocks = ("nv_trt_llm_kv_cache_block_metrics", (("kv_cache_block_type", "max"), ("model", "generation"),
                                                    ("version", "1")))
    assert m0[blocks] == sum(w["kv_blocks"] for w in dep.stats()["workers"] if w["role"] == "generation")
    await post(dep, "/v2/models/ensemble/generate", {"text_input": PROMPT, "max_tokens": 3})
    dep.wait_idle()
    m1 = parse((await get(dep, "/metrics"))[2])
    count = ("nv_trt_llm_disaggregated_serving_metrics_total", (("disaggregated_serving_type", "request_count"),
                                                                ("model", "generation"), ("version", "1")))
    assert m1[count] == m0[count] + 1


# -- the pure parts ------------------------------------------------------------------------------

def test_bls_defaults_are_greedy_and_sampling_follows_top_k_top_p():
    r = bls_request(json_values({"text_input": "hi", "max_tokens": 4}))
    assert r.sampling == {"max_tokens": 4, "temperature": 0.0} and not r.stream and not r.exclude_input
    r = bls_request(json_values({"text_input": "hi", "max_tokens": 4, "top_k": 5, "top_p": 0.9, "temperature": 0.5,
                                 "random_seed": 2**64 - 1, "stop_words": ['"a,b",c,'], "end_id": 7}))
    assert r.sampling == {"max_tokens": 4, "temperature": 0.5, "top_k": 5, "top_p": 0.9, "seed": 2**63 - 1,
                          "stop": ["a,b", "c"], "ignore_eos": True, "stop_token_ids": [7]}
    r = bls_request(json_values({"text_input": "hi", "max_tokens": 4, "top_p": 0.5}))
    assert r.sampling == {"max_tokens": 4, "temperature": 1.0, "top_p": 0.5}     # TensorRT-LLM's temperature 1
    with pytest.raises(HttpError, match="stop_words holds 17 words"):
        bls_request(json_values({"text_input": "hi", "max_tokens": 4, "stop_words": ",".join("abcdefghijklmnopq")}))


def test_kserve_binary_tensors_round_trip_and_bad_data_is_named():
    raw_text = b"".join(struct.pack("<I", len(s)) + s for s in (b"hello", "\u00e9t\u00e9".encode()))
    raw_ints = struct.pack("<2i", 5, -6)
    head = json.dumps({"inputs": [
        {"name": "t", "datatype": "BYTES", "shape": [2, 1], "parameters": {"binary_data_size": len(raw_text)}},
        {"name": "n", "datatype": "INT32", "shape": [2], "parameters": {"binary_data_size": 8}},
        {"name": "f", "datatype": "FP32", "shape": [1, 1], "data": [[0.5]]}]}).encode()
    req, tensors = parse_infer_request(head + raw_text + raw_ints, str(len(head)))
    assert [(t.name, t.shape, t.data) for t in tensors] == [
        ("t", [2, 1], ["hello", "\u00e9t\u00e9"]), ("n", [2], [5, -6]), ("f", [1, 1], [0.5])]
    with pytest.raises(TensorError, match="'n': binary_data_size=8 does not fit the 6 bytes"):
        parse_infer_request(head + raw_text + raw_ints[:6], str(len(head)))
    short = head.replace(b'"binary_data_size": 8', b'"binary_data_size": 6')
    with pytest.raises(TensorError, match="'n': 6 bytes of binary data do not hold 2 INT32"):
        parse_infer_request(short + raw_text + raw_ints[:6], str(len(short)))
    with pytest.raises(TensorError, match="'f'.*do not fill"):
        parse_infer_request(json.dumps({"inputs": [{"name": "f", "datatype": "FP32", "shape": [2], "data": [1]}]})
                            .encode(), None)
    body, headers = encode_infer_response({"model_name": "m"}, [Tensor("t", "BYTES", [1, 1], ["ok"]),
                                                                 Tensor("x", "FP32", [1], [0.25])], {"t"})
    n = int(headers["Inference-Header-Content-Length"])
    out = json.loads(body[:n])
    assert out["outputs"][0]["parameters"]["binary_data_size"] == 6 and out["outputs"][1]["data"] == [0.25]
    assert body[n:] == struct.pack("<I", 2) + b"ok"


async def test_an_error_after_the_stream_started_is_one_error_event():
    """A worker dying mid-answer (here a fake client's second chunk) ends the stream with
    ``data: {"error": ...}``: the 200 is already sent, and there is no [DONE]."""
    from aiohttp import web

    from broker.protocol import Code
    from client.errors import RequestFailed
    from client.gateway import Gateway
    from client.request import Chunk

    class Stream:
        def __init__(self):
            self.sent = 0
            self.completion = None

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        def __aiter__(self):
            return self

        async def __anext__(self):
            self.sent += 1
            if self.sent == 1:
                return Chunk("r", 0, [5], "Hel")
            raise RequestFailed(Code.WORKER_DIED, "worker gen0 stopped answering", retryable=True)

    class FakeClient:
        def stream(self, **kw):
            return Stream()

    gw = Gateway("tcp://127.0.0.1:9", triton_chat_template="off")     # off: no look at the workers
    gw.client = FakeClient()
    runner = web.AppRunner(gw.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v2/models/ensemble/generate_stream"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            async with s.post(url, json={"text_input": "x", "max_tokens": 4, "stream": True}) as r:
                status, text = r.status, await r.text()
    finally:
        await runner.cleanup()
    events = [json.loads(e) for e in sse_events(text)]
    assert status == 200 and events[0]["text_output"] == "Hel"
    assert events[1:] == [{"error": "worker gen0 stopped answering"}]


async def test_a_failing_row_fails_the_infer_batch_and_stops_the_others(dep):
    rows = [PROMPT, "long " * 3000]                   # the second is longer than the tiny model's context
    status, _, text = await post(dep, "/v2/models/ensemble/infer", {"inputs": [
        {"name": "text_input", "datatype": "BYTES", "shape": [2, 1], "data": rows},
        {"name": "max_tokens", "datatype": "INT32", "shape": [2, 1], "data": [[200], [4]]},
        {"name": "end_id", "datatype": "INT32", "shape": [2, 1], "data": [[10**6], [10**6]]}]})
    assert status == 400 and "context" in json.loads(text)["error"], text
    dep.wait_idle()
    status, _, text = await post(dep, "/v2/models/ensemble/infer", {"inputs": [
        {"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": [PROMPT]},
        {"name": "max_tokens", "datatype": "INT32", "shape": [1, 2], "data": [[4, 5]]}]})
    assert status == 400 and "max_tokens" in json.loads(text)["error"], text


async def test_two_batches_with_the_same_x_request_id_at_once_both_run(dep, want):
    """Their rows go to the broker as triton-ID-i: the second batch's get a suffix there."""
    body = {"inputs": [
        {"name": "text_input", "datatype": "BYTES", "shape": [2, 1], "data": [PROMPT, PROMPT]},
        {"name": "max_tokens", "datatype": "INT32", "shape": [2, 1], "data": [[8], [8]]}]}
    both = await asyncio.gather(*(post(dep, "/v2/models/ensemble/infer", body,
                                       headers={"Content-Type": "application/json", "X-Request-Id": "batch"})
                                  for _ in range(2)))
    for status, headers, text in both:
        assert status == 200 and CIMultiDict(headers)["X-Request-Id"] == "batch", text   # names in any case
        out = {o["name"]: o for o in json.loads(text)["outputs"]}["text_output"]
        assert [t.endswith(want.text) for t in out["data"]] == [True, True], out
    dep.wait_idle()


@pytest.mark.parametrize("body,needle", [
    ({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x"], "parameters": [1]}]},
     "parameters=[1] must be a JSON object"),
    ({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x"]},
                 {"name": "max_tokens", "datatype": "INT32", "shape": [1], "data": [2]}], "parameters": "binary"},
     'parameters="binary" must be a JSON object'),
    ({"inputs": [{"name": "text_input", "datatype": "STRING", "shape": [1], "data": ["x"]}]}, "datatype"),
    ({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x"]},
                 {"name": "max_tokens", "datatype": "INT32", "shape": [1], "data": [2]}],
      "outputs": [{"name": "logits"}]}, "unknown output"),
    ({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x"]},
                 {"name": "max_tokens", "datatype": "FP32", "shape": [1], "data": [2.5]}]}, "max_tokens"),
    ({"inputs": "x"}, "inputs"),
    ({"inputs": []}, "missing required input 'text_input'"),
])
async def test_malformed_infer_requests_are_400s_naming_the_problem(dep, body, needle):
    status, _, text = await post(dep, "/v2/models/ensemble/infer", body)
    assert status == 400 and needle in json.loads(text)["error"], text
