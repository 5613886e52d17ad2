"""The official openai package against the gateway, on the embedded default model (SmolLM2)."""
import openai
import pytest

from tests.harness import Deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

OPTS = {"kv_cache_config": {"max_tokens": 2048}, "max_num_tokens": 256, "heartbeat_ms": 1000}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_openai_package_gets_completions_and_chat_streamed_and_not_from_smollm2():
    # liveness 5 s: a SmolLM2 prefill chunk takes well under that on 2 cores
    with Deployment(http=True, heartbeat_s=1.0, liveness=5) as d:
        d.add_worker("context", "ctx", model="smollm2-135m", options=OPTS, timeout=300)
        d.add_worker("generation", "gen", model="smollm2-135m", options=OPTS, timeout=300)
        oa = openai.OpenAI(base_url=d.http + "/v1", api_key="x", max_retries=0, timeout=300)
        assert [m.id for m in oa.models.list().data] == ["smollm2-135m"]

        chat = oa.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=8, temperature=0)
        answer = chat.choices[0].message.content
        assert "Paris" in answer, answer
        assert chat.usage.completion_tokens <= 8 and chat.usage.prompt_tokens > 5

        chunks = list(oa.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=8,
                                                 temperature=0, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == answer
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")

        done = oa.completions.create(model="smollm2-135m", prompt="The three primary colors are",
                                     max_tokens=6, temperature=0)
        text = done.choices[0].text
        assert text.strip() and done.usage.completion_tokens <= 6
        chunks = list(oa.completions.create(model="smollm2-135m", prompt="The three primary colors are",
                                            max_tokens=6, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == text

        # log-probabilities on a real BPE vocabulary: greedy picks each position's likeliest token,
        # and the tokens' bytes spell the answer (the end-of-turn token's own bytes aside)
        chat = oa.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=3, n=2)
        assert [c.message.content for c in chat.choices] == [answer, answer]
        content = chat.choices[0].logprobs.content
        assert all(t.token == t.top_logprobs[0].token and t.logprob == t.top_logprobs[0].logprob for t in content)
        spelled = b"".join(bytes(t.bytes) for t in content).decode()
        assert spelled.replace("<|im_end|>", "") == answer and -20 < sum(t.logprob for t in content) < 0
        echo = oa.completions.create(model="smollm2-135m", prompt="The three primary colors are", max_tokens=6,
                                     temperature=0, logprobs=1, echo=True)
        lp = echo.choices[0].logprobs
        assert echo.choices[0].text == "The three primary colors are" + text
        assert "".join(lp.tokens) == echo.choices[0].text and lp.token_logprobs[0] is None
        assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
        assert [echo.choices[0].text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens
        oa.close()
        d.wait_idle()
