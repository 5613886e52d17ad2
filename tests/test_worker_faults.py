"""A worker under bad input from its peers: a KV source that survives malformed requests, a
worker that leaves service when one of its threads dies anyway, one reconnect per storm of
Reconnects, and long prompts that neither starve the heartbeat nor cost seconds to refuse.

The worker runs in this process (tiny model, ZMQ transfer) against a bare ROUTER standing in for
the broker, so the test sees every message it sends."""
from __future__ import annotations

import threading
import time

import pytest
import zmq

from broker import protocol as p
from transfer import messages
from transfer.config import CacheTransceiverConfig
from workers.options import WorkerOptions
from workers.worker import Worker

pytestmark = pytest.mark.timeout(120)


class FakeBroker:
    """A ROUTER on a free port; ``recv()`` gives (identity, message) pairs with a deadline."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv(self, timeout: float = 10.0) -> list:
        """Every message that arrives within ``timeout`` seconds (at least one, or [])."""
        out, deadline = [], time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and self.sock.poll(int(left * 1000) + 1):
            ident, *frames = self.sock.recv_multipart()
            out.extend((ident, m) for m in p.decode_all(frames))
            if not self.sock.poll(0):
                break
        return out

    def collect(self, seconds: float) -> list:
        """Everything that arrives in the next ``seconds`` seconds."""
        out, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000) + 1):
                ident, *frames = self.sock.recv_multipart()
                out.extend((ident, m) for m in p.decode_all(frames))
        return out

    def wait_for(self, kind, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ident, m in self.recv(deadline - time.monotonic()):
                if isinstance(m, kind):
                    return ident, m
        pytest.fail(f"no {kind.__name__} from the worker within {timeout} s")

    def send(self, ident: bytes, *msgs) -> None:
        self.sock.send_multipart([ident, *p.encode_many(list(msgs))])

    def close(self):
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def broker():
    b = FakeBroker()
    yield b
    b.close()


@pytest.fixture
def run_worker(broker):
    """run_worker(role, **options) -> a Worker running in a thread, stopped at the end."""
    started = []

    def start(role: str, model: str = "tiny", **over) -> Worker:
        kw = dict(num_threads=1, device="cpu", heartbeat_ms=100,
                  cache_transceiver=CacheTransceiverConfig(backend="ZMQ"))
        opts = WorkerOptions(**{**kw, **over})
        w = Worker(role, broker.address, model, opts, worker_id=f"{role}-under-test")
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        started.append((w, t))
        return w

    yield start
    for w, t in started:
        w.stop()
        t.join(30)
        assert not t.is_alive(), "the worker did not stop"


def test_malformed_kv_requests_leave_the_source_serving(run_worker, broker):
    w = run_worker("context")
    broker.wait_for(p.Ready)
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(w.source.endpoint)
        deep = b"\x91" * 100_000 + b"\xc0"
        for body in [b"\x93\xa4done\x01\x91\xa1t",                  # a transfer id that is an array
                     b"\x94\xa4done\x01\xa1t" + deep,                 # a trailing element nested deep
                     b"\x93\xa5start\x01" + deep, b"\xc1", b""]:
            s.send_multipart([messages.MAGIC, body])
        s.send_multipart(messages.encode(messages.Start(7, "never-registered")))
        assert s.poll(10_000), "the KV source stopped answering"
        answer = messages.decode_answer(s.recv_multipart()[1])
        assert isinstance(answer, messages.Refused) and answer.seq == 7
        assert w.source.alive
    finally:
        ctx.destroy(0)


def test_a_worker_whose_kv_thread_dies_leaves_service(run_worker, broker):
    w = run_worker("context")
    broker.wait_for(p.Ready)

    def crash():
        raise RuntimeError("a bug in the data plane")
    w.source._plane.progress = crash           # the channel thread's next turn raises
    ident, msg = broker.wait_for(p.Disconnect, 20)
    assert "KV source thread died" in msg.reason
    deadline = time.monotonic() + 10
    while w.sock is not None and not w.sock.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.failure and "KV source" in w.failure
    assert not [m for _, m in broker.collect(0.5) if isinstance(m, p.Heartbeat)], "still heartbeating"


def test_a_batch_of_reconnects_registers_once(run_worker, broker):
    run_worker("generation")
    ident, _ = broker.wait_for(p.Ready)
    broker.send(ident, *[p.Reconnect("unknown worker; send Ready")] * 20)
    readies, deadline = [], time.monotonic() + 20
    while not readies and time.monotonic() < deadline:      # every Ready, from the first on
        readies = [(i, m) for i, m in broker.recv(1.0) if isinstance(m, p.Ready)]
    readies += [(i, m) for i, m in broker.collect(1.5) if isinstance(m, p.Ready)]
    assert len(readies) == 1, f"{len(readies)} registrations for one batch of Reconnects"
    # Reconnects in batches of their own, one after the other, are not a storm either
    ident = readies[0][0]
    for _ in range(5):
        broker.send(ident, p.Reconnect("again"))
    assert len([m for _, m in broker.collect(1.0) if isinstance(m, p.Ready)]) <= 1


@pytest.mark.slow
def test_a_4mb_prompt_is_refused_before_it_is_tokenised(run_worker, broker):
    w = run_worker("context", model="smollm2-135m", heartbeat_ms=200)
    ident, _ = broker.wait_for(p.Ready, 60)
    encoded = []
    real = w.tok.encode
    w.tok.encode = lambda t: encoded.append(len(t)) or real(t)
    text = ("The quick brown fox jumps over the lazy dog. " * 100_000)[:4_000_000]
    broker.send(ident, p.Prefill("big", 1, prompt=text), p.Prefill("big2", 1, prompt=text))
    failed, deadline = {}, time.monotonic() + 30
    while len(failed) < 2 and time.monotonic() < deadline:
        for _, m in broker.recv(1.0):
            if isinstance(m, p.Failed):
                failed[m.request_id] = m
    assert set(failed) == {"big", "big2"}
    assert all(f.code == p.Code.INVALID_REQUEST and "4000000 characters" in f.message
               and f"max_seq_len {w.max_seq_len}" in f.message for f in failed.values())
    assert encoded == [], "a prompt that cannot fit was tokenised"


def test_a_long_tokenisation_runs_off_the_loop_and_the_heartbeat_goes_on(run_worker, broker, monkeypatch):
    import workers.worker as worker_module
    monkeypatch.setattr(worker_module, "OFF_LOOP_CHARS", 100, raising=False)
    w = run_worker("context")
    ident, _ = broker.wait_for(p.Ready)
    real = w.tok.encode
    threads, window, sent = [], [], []

    def slow_encode(text):          # a tokenizer that takes 2 s (and releases the GIL, as HF's does)
        threads.append(threading.current_thread().name)
        window.append(time.monotonic())
        time.sleep(2.0)
        window.append(time.monotonic())
        return real(text)
    w.tok.encode = slow_encode
    beat = w.sched.heartbeat_if_due

    def recorded():
        due = beat()
        if due:
            sent.append(time.monotonic())
        return due
    w.sched.heartbeat_if_due = recorded
    broker.send(ident, p.Prefill("slow", 1, prompt="x" * 200, sampling={"max_tokens": 1}))
    done, deadline = None, time.monotonic() + 30
    while done is None and time.monotonic() < deadline:
        for _, m in broker.recv(1.0):
            if isinstance(m, p.ContextDone) and m.request_id == "slow":
                done = m
    assert done is not None and len(done.prompt_token_ids) == 200
    assert threads and threads[0] != "MainThread" and not threads[0].startswith("Thread-")
    during = [t for t in sent if window[0] < t < window[1]]
    assert len(during) >= 2, f"{len(during)} heartbeats while the prompt was tokenised for 2 s"
