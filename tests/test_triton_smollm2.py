"""Triton's generate API on the embedded default model (SmolLM2, an instruct model).

The BLS passes ``text_input`` to the tokenizer as it is, with no chat template, and so do we:
asked the bare question, SmolLM2 ends its turn at once (its first greedy token is
``<|im_end|>``), so ``text_output`` is the question alone, as Triton would answer. Triton users
of instruct models send the template themselves; with it the answer is Paris.
"""
import json

import pytest

from client import Client
from tests.harness import Deployment
from tests.test_gateway import post, sse_events
from tests.test_gateway_smollm2 import OPTS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUESTION = "What is the capital of France?"
# as Triton users send it; no temperature: the BLS default (no top_k, no top_p) is greedy
ASK = {"text_input": QUESTION, "max_tokens": 20, "bad_words": "", "stop_words": ""}
CHAT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


async def test_ensemble_generate_answers_paris_and_generate_stream_streams_the_same_text():
    with Deployment(http=True, heartbeat_s=1.0, liveness=5) as d:
        d.add_worker("context", "ctx", model="smollm2-135m", options=OPTS, timeout=300)
        d.add_worker("generation", "gen", model="smollm2-135m", options=OPTS, timeout=300)
        with Client(d.frontend, timeout=300) as c:
            bare = c.generate(QUESTION, max_tokens=20, temperature=0)
        status, _, text = await post(d, "/v2/models/ensemble/generate", ASK)
        assert status == 200 and json.loads(text)["text_output"] == QUESTION + bare.text, text

        status, _, text = await post(d, "/v2/models/ensemble/generate", {**ASK, "text_input": CHAT})
        assert status == 200, text
        out = json.loads(text)["text_output"]
        assert out.startswith(CHAT) and "Paris" in out[len(CHAT):], out
        status, _, text = await post(d, "/v2/models/ensemble/generate_stream", {**ASK, "text_input": CHAT,
                                                                                 "stream": True})
        assert status == 200, text
        assert CHAT + "".join(json.loads(e)["text_output"] for e in sse_events(text)) == out
        d.wait_idle()
