"""Stream migration with real processes: a generation worker SIGKILLed mid-stream, its request
continued on another one; the client sees every token exactly once and, with greedy or seeded
sampling, the same text as an uninterrupted run."""
import os
import signal
import time

import pytest

from broker import protocol as p
from tests.harness import Deployment, raw_client

pytestmark = pytest.mark.timeout(180)

PROMPT = [(7 * j + 3) % 256 for j in range(24)]
MAX_TOKENS = 600


def _run(frontend: str, rid: str, sampling: dict, on_token=None, timeout: float = 60.0):
    """Submit over a bare socket and collect every Tokens/Final/Error the broker sends for it, so
    a duplicate the client library would drop silently is seen here. Returns (indices, ids,
    text, last message)."""
    indices, ids, text = [], [], []
    with raw_client(frontend) as s:
        s.send_multipart(p.Submit(rid, token_ids=PROMPT, sampling=sampling).encode())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and s.poll(int((deadline - time.monotonic()) * 1000) + 1):
            for m in p.decode_all(s.recv_multipart()):
                if isinstance(m, (p.Tokens, p.Final)) and m.token_ids:
                    indices.extend(range(m.index, m.index + len(m.token_ids)))
                    ids.extend(m.token_ids)
                    text.append(m.text)
                    if on_token is not None:
                        on_token(len(ids))
                if isinstance(m, (p.Final, p.Error)):
                    return indices, ids, "".join(text), m
    pytest.fail(f"request {rid} got no final within {timeout} s")


def _stop_at(d: Deployment, name: str, n: int):
    """An on_token hook that freezes worker ``name`` once ``n`` tokens arrived (it is SIGKILLed
    after: a stopped worker sends nothing more, so the cut is where the client is now)."""
    state = {"done": False}

    def hook(count: int) -> None:
        if not state["done"] and count >= n:
            state["done"] = True
            os.kill(d.workers[name].pid, signal.SIGSTOP)
    return hook, state


@pytest.mark.parametrize("sampling", [
    {"temperature": 0.0},
    {"temperature": 0.9, "top_k": 40, "seed": 1234},
    # text that may start the stop string is held back, and moves with the stream untold
    {"temperature": 0.0, "stop": ["e\x00\x00", "t\x00\x00", " \x00\x00"]},
], ids=["greedy", "seeded", "greedy-held-back-text"])
def test_killed_generation_worker_stream_moves_and_matches_an_uninterrupted_run(sampling):
    sampling = dict(sampling, max_tokens=MAX_TOKENS, ignore_eos=True)
    with Deployment() as d:
        d.add_worker("context", "ctx")
        d.add_worker("generation", "gen1", options={"max_batch_size": 64})
        d.add_worker("generation", "gen2", options={"max_batch_size": 1})   # fewer credits: 2nd choice
        ref_idx, ref_ids, ref_text, ref_final = _run(d.frontend, "ref", sampling)
        assert isinstance(ref_final, p.Final) and len(ref_ids) == MAX_TOKENS
        assert ref_idx == list(range(MAX_TOKENS))

        hook, stopped = _stop_at(d, "gen1", 5)
        idx, ids, text, final = _run(d.frontend, "moved", dict(sampling), on_token=hook)
        assert stopped["done"]
        d.kill("gen1")
        assert isinstance(final, p.Final), final
        assert idx == list(range(MAX_TOKENS))          # no gap, no duplicate
        assert ids == ref_ids and text == ref_text     # exactly the uninterrupted run
        assert final.finish_reason == "length"
        assert (final.usage["prompt_tokens"], final.usage["completion_tokens"]) == (len(PROMPT), MAX_TOKENS)
        s = d.wait_idle()
        assert s["counters"]["migrated"] == 1
        assert {w["worker_id"] for w in s["workers"]} == {"ctx", "gen2"}


def test_past_max_migrations_the_request_fails_clearly():
    with Deployment(max_migrations=0) as d:
        d.add_worker("context", "ctx")
        d.add_worker("generation", "gen1", options={"max_batch_size": 64})
        d.add_worker("generation", "gen2", options={"max_batch_size": 1})
        hook, stopped = _stop_at(d, "gen1", 3)
        _, ids, _, last = _run(d.frontend, "r", {"max_tokens": MAX_TOKENS, "ignore_eos": True},
                               on_token=hook)
        d.kill("gen1")
        assert stopped["done"] and isinstance(last, p.Error), last
        assert last.code == p.Code.WORKER_DIED and "gen1" in last.message
        assert "broker.max_migrations=0" in last.message
        s = d.wait_idle()
        assert s["counters"]["migrated"] == 0
