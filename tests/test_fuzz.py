"""A live broker under junk (issue 13): hypothesis-fuzzed frames on both sockets while canary
requests run, a flood of Readys under new worker ids and roles, oversized messages. Each checks
that the broker stays alive and keeps serving, and that its memory and /metrics stay bounded.
``python -m bench.fuzz`` runs the same fuzzing with 10,000 frames a socket and prints the figures."""
import time

import msgpack
import pytest
import zmq

from bench.fuzz import Canaries, fuzz, metrics_bytes, rss_bytes
from broker import protocol as p
from client import Client
from tests.harness import Deployment, raw_client

pytestmark = pytest.mark.timeout(300)

FRAMES = 2500         # on each socket: about 15 s on the test machine


@pytest.fixture(scope="module")
def dep():
    with Deployment() as d:
        d.add_worker("context", "ctx")
        d.add_worker("generation", "gen")
        yield d


def canary(d) -> None:
    with Client(d.frontend, timeout=60) as c:
        assert len(c.generate(token_ids=[5, 6, 7], max_tokens=4, ignore_eos=True).token_ids) == 4


def test_fuzzed_frames_on_both_sockets_leave_the_broker_serving_with_flat_memory(dep):
    pid = dep.broker.pid
    fuzz(dep.frontend, dep.backend, 300, rng_seed=1)          # warm up: first-use allocations
    rss0, metrics0 = rss_bytes(pid), metrics_bytes(dep.frontend)
    with Canaries(dep.frontend) as canaries:
        counts = fuzz(dep.frontend, dep.backend, FRAMES, rng_seed=0)
    assert counts["sent"] == FRAMES and dep.broker.poll() is None
    assert canaries.errors == [] and len(canaries.done) >= 1 and set(canaries.done) == {8}
    growth = rss_bytes(pid) - rss0
    assert growth < 5 * 2**20, f"broker RSS grew {growth / 2**20:.1f} MB over {FRAMES} frames a socket"
    assert metrics_bytes(dep.frontend) < metrics0 + 16_384
    canary(dep)
    dep.wait_idle(60)


def test_readys_under_new_ids_and_roles_do_not_grow_the_metrics(dep):
    before = metrics_bytes(dep.frontend)
    with raw_client(dep.backend) as s:
        for i in range(2000):
            body = {"worker_id": f"junk-{i}", "role": f"role-{i}" if i % 2 else "context", "model": "m",
                    "slots": 0, "kv_blocks": 10, "heartbeat_ms": 3_600_000 if i % 3 == 0 else 1000}
            s.send(p.header(p.Ready.CMD) + msgpack.packb(body))
        s.send_multipart(p.Disconnect("done").encode())
        time.sleep(0.5)
        after = metrics_bytes(dep.frontend)
    assert after < before + 2048, f"/metrics grew from {before} to {after} bytes"
    assert {w["worker_id"] for w in dep.stats()["workers"]} == {"ctx", "gen"}
    canary(dep)


def test_an_oversized_message_is_dropped_and_its_sender_disconnected(dep):
    big = p.Submit("big-1", prompt="x" * (p.MAX_MESSAGE_BYTES + 1024)).encode()
    with raw_client(dep.frontend) as s:
        s.setsockopt(zmq.SNDTIMEO, 10_000)
        s.send_multipart(big)
        assert not s.poll(1500), "an oversized Submit was answered"
    assert dep.broker.poll() is None and dep.stats()["requests"] == 0
    canary(dep)


def test_a_submit_nested_1000_deep_is_answered_with_an_error_naming_it(dep):
    body = msgpack.packb({"request_id": "deep-1", "prompt": "hi"})
    frame = p.header(p.Submit.CMD) + bytes([body[0] + 1]) + body[1:] + msgpack.packb("sampling") \
        + b"\x81\xa4stop" + b"\x91" * 1000 + b"\xc0"
    with raw_client(dep.frontend) as s:
        s.send(frame)
        assert s.poll(10_000), "no answer"
        (err,) = p.decode_all(s.recv_multipart())
    assert isinstance(err, p.Error) and err.request_id == "deep-1" and err.code == p.Code.INVALID_REQUEST
    assert "sampling" in err.message
    canary(dep)
