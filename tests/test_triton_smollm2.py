"""Triton's generate API on the embedded default model (SmolLM2, an instruct model).

The BLS passes ``text_input`` to the tokenizer as it is; asked the bare question that way,
SmolLM2 ends its turn at once (its first greedy token is ``<|im_end|>``). The gateway's
``--triton-chat-template auto`` (the default) applies the model's chat template to a text_input
that holds none of the template's markers, so the issue's curl gets Paris; a text_input that is
templated already goes as it is.
"""
import json

import numpy as np
import pytest
import tritonclient.http as triton

from tests.harness import Deployment
from tests.test_gateway import post, sse_events
from tests.test_gateway_smollm2 import OPTS
from tests.test_triton import host

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUESTION = "What is the capital of France?"
# the curl, as Triton users send it; no temperature: the BLS default (no top_k, no
# top_p) is greedy
ASK = {"text_input": QUESTION, "max_tokens": 20, "bad_words": "", "stop_words": ""}
CHAT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


async def test_ensemble_generate_answers_paris_and_generate_stream_streams_the_same_text():
    with Deployment(http=True, heartbeat_s=1.0, liveness=5) as d:
        d.add_worker("context", "ctx", model="smollm2-135m", options=OPTS, timeout=300)
        d.add_worker("generation", "gen", model="smollm2-135m", options=OPTS, timeout=300)
        status, _, text = await post(d, "/v2/models/ensemble/generate", ASK)
        assert status == 200, text
        out = json.loads(text)["text_output"]
        assert out.startswith(QUESTION) and "Paris" in out[len(QUESTION):], out
        status, _, text = await post(d, "/v2/models/ensemble/generate_stream", {**ASK, "stream": True})
        assert status == 200, text
        assert QUESTION + "".join(json.loads(e)["text_output"] for e in sse_events(text)) == out
        # tritonclient.http's infer on the same BLS inputs, as KServe v2 tensors: the same answer
        c = triton.InferenceServerClient(host(d), network_timeout=120.0)
        try:
            tensors = []
            for name, arr, dt in [("text_input", np.array([[QUESTION.encode()]], dtype=object), "BYTES"),
                                  ("max_tokens", np.array([[20]], dtype=np.int32), "INT32"),
                                  ("bad_words", np.array([[b""]], dtype=object), "BYTES"),
                                  ("stop_words", np.array([[b""]], dtype=object), "BYTES")]:
                tensors.append(triton.InferInput(name, list(arr.shape), dt))
                tensors[-1].set_data_from_numpy(arr)
            assert c.infer("ensemble", tensors).as_numpy("text_output")[0][0].decode() == out
        finally:
            c.close()

        # templated already (its markers are in it): sent as it is, not templated twice
        status, _, text = await post(d, "/v2/models/ensemble/generate", {**ASK, "text_input": CHAT})
        assert status == 200, text
        templated = json.loads(text)["text_output"]
        assert templated.startswith(CHAT) and "Paris" in templated[len(CHAT):], templated
        d.wait_idle()
