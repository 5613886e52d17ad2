"""ZMQ backend under faults: a stopped or killed context worker, late answers, a stalled puller,
a context worker that answers out of protocol."""
import signal
import time

import msgspec
import pytest
import torch
import zmq

from transfer import messages, zmq_backend
from transfer.base import KvLayout, TransferError, TransferTimeout, make_handle, token_view
from transfer.config import CacheTransceiverConfig
from transfer.loopback import LoopbackSource, fill_pool
from transfer.registry import create_sink, create_source

LAYOUT = KvLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=16)
BIG = KvLayout(num_layers=2, num_kv_heads=2, head_dim=128, dtype="float32", block_size=16)


def empty_pool(lay, num_blocks):
    return torch.zeros(num_blocks, lay.num_layers, 2, lay.block_size, lay.num_kv_heads,
                       lay.head_dim)


def wait_result(sink, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        results = sink.poll()
        if results:
            assert len(results) == 1
            return results[0]
        assert time.monotonic() < deadline, f"no result in {timeout} s"
        time.sleep(0.002)


def same_blocks(pool, lay, dst_ids, src_ids, num_src_blocks, seed):
    want = fill_pool(lay, num_src_blocks, seed).view(torch.uint8)
    return torch.equal(pool.view(torch.uint8)[dst_ids], want[src_ids])


@pytest.fixture
def closing():
    """closing(obj) -> obj, closed at the end of the test whatever happened."""
    objs = []
    yield lambda obj: objs.append(obj) or obj
    for obj in reversed(objs):
        obj.close()


@pytest.mark.timeout(60)
def test_stopped_source_times_out_late_answer_is_dropped_and_source_expires(closing):
    cfg = CacheTransceiverConfig(backend="ZMQ", kv_transfer_timeout_ms=600)
    with LoopbackSource(LAYOUT, 64, 3, {"backend": "ZMQ", "kv_transfer_timeout_ms": 600}) as src:
        first, second = src.register("t1", [1, 2], 20), src.register("t2", [7, 8, 9], 40)
        pool = empty_pool(LAYOUT, 16)
        sink = closing(create_sink(cfg, pool, LAYOUT))
        src.signal(signal.SIGSTOP)
        started = time.monotonic()
        sink.start_pull("p1", first, [0, 1])
        r = wait_result(sink)
        assert isinstance(r.error, TransferTimeout) and "timed out" in str(r.error)
        assert "kv_transfer_timeout_ms=600" in str(r.error)
        assert r.error.code == "KV_TRANSFER_TIMEOUT"
        assert 0.5 < time.monotonic() - started < 5 and sink.num_active == 0
        src.signal(signal.SIGCONT)           # it now answers p1's request, too late
        sink.start_pull("p2", second, [5, 6, 7])
        assert wait_result(sink).ok
        assert same_blocks(pool, LAYOUT, [5, 6, 7], [7, 8, 9], 64, 3)
        assert not pool[:2].any(), "the late answer to the timed-out pull was written"
        events, deadline = set(), time.monotonic() + 20
        while ("expired", "t1") not in events:
            assert time.monotonic() < deadline, events
            events |= {tuple(e) for e in src.call(op="wait_events", timeout=10.0)["events"]}
        assert events == {("pulled", "t2"), ("expired", "t1")}
        assert src.call(op="poll")["num_registered"] == 0
        src.signal(signal.SIGSTOP)
        src.signal(signal.SIGKILL)


@pytest.mark.timeout(60)
def test_source_killed_mid_transfer_fails_fast_with_a_clear_error(closing):
    cfg = CacheTransceiverConfig(backend="ZMQ", max_tokens_in_buffer=16,
                                 kv_transfer_timeout_ms=30_000)
    with LoopbackSource(BIG, 512, 4, {"backend": "ZMQ"}) as src:
        handle = src.register("t", list(range(512)), 512 * 16)
        sink = closing(create_sink(cfg, empty_pool(BIG, 512), BIG))
        sink.start_pull("p", handle, list(range(512)))
        deadline = time.monotonic() + 20
        while sink.rounds_done < 1:          # one round of 512 has arrived: kill it mid-way
            assert time.monotonic() < deadline
            sink.poll()                      # a result here leaves num_active at 0: caught below
        src.signal(signal.SIGSTOP)
        assert sink.num_active == 1, "the transfer finished before the kill"
        killed = time.monotonic()
        src.signal(signal.SIGKILL)
        r = wait_result(sink)
    assert not r.ok and isinstance(r.error, TransferError)
    assert "context worker" in str(r.error) and "lost the connection" in str(r.error)
    assert time.monotonic() - killed < 10 and sink.num_active == 0


def _raw_puller(ctx, endpoint, **opts):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for opt, value in opts.items():
        sock.setsockopt(getattr(zmq, opt), value)
    sock.connect(endpoint)
    return sock


def _ask(sock, msg):
    sock.send_multipart(messages.encode(msg))


def _answer(sock, timeout_ms=10_000):
    """(the answer as a dict of its fields, the frames after it)"""
    assert sock.poll(timeout_ms), "no answer"
    frames = sock.recv_multipart()
    assert frames[0] == messages.MAGIC
    return msgspec.structs.asdict(messages.decode_answer(frames[1])), frames[2:]


def _pull(sock, seq, tid, block, nblocks, lay, frame_bytes=1 << 20):
    """A raw pull of blocks ``[block, block + nblocks)``: Start, then one Round of frames tagged
    0, 1, ... (the Start's Ack is read here; the Round is answered by frames or a refusal)."""
    _ask(sock, messages.Start(seq, tid))
    ack = _answer(sock)[0]
    if "error" in ack:
        return ack
    off, size = block * lay.block_nbytes, nblocks * lay.block_nbytes
    frames = [(off + o, min(frame_bytes, size - o), i)
              for i, o in enumerate(range(0, size, frame_bytes))]
    _ask(sock, messages.Round(seq + 1, tid, frames))
    return None


@pytest.mark.timeout(60)
def test_source_expires_a_started_transfer_and_refuses_it_afterwards(closing):
    cfg = CacheTransceiverConfig(backend="ZMQ", kv_transfer_timeout_ms=300)
    source = closing(create_source(cfg, fill_pool(LAYOUT, 8, 5), LAYOUT))
    source.register("t", [3, 4], 20)
    ctx = zmq.Context()
    try:
        sock = _raw_puller(ctx, source.endpoint)
        sock.send_multipart([b"junk"])        # malformed: dropped, the source keeps going
        sock.send_multipart(messages.encode(messages.Start(1, "t"))[:1] + [b"\x93\xa5start"])
        _pull(sock, 1, "t", 3, 1, LAYOUT)
        header, data = _answer(sock)
        assert header == {"tag": 0, "nbytes": LAYOUT.block_nbytes}
        assert bytes(data[0]) == fill_pool(LAYOUT, 8, 5)[3].numpy().tobytes()
        _pull(sock, 3, "t", 5, 1, LAYOUT)
        assert "outside transfer" in _answer(sock)[0]["error"]
        events, deadline = [], time.monotonic() + 10
        while not events:
            assert time.monotonic() < deadline
            events = source.poll()
            time.sleep(0.005)
        assert [(e.kind, e.transfer_id) for e in events] == [("expired", "t")]
        assert source.num_registered == 0
        header = _pull(sock, 5, "t", 4, 1, LAYOUT)
        assert header["seq"] == 5 and "no longer holds the KV for transfer 't'" in header["error"]
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(60)
def test_release_with_a_stalled_puller_stops_reading_the_blocks(closing, monkeypatch, caplog):
    monkeypatch.setattr(zmq_backend, "RELEASE_WAIT_S", 0.3)
    lay = KvLayout(num_layers=4, num_kv_heads=8, head_dim=128, dtype="float32", block_size=16)
    cfg = CacheTransceiverConfig(backend="ZMQ")
    source = closing(create_source(cfg, fill_pool(lay, 66, 6), lay))
    source.register("t", list(range(64)), 64 * 16)        # 64 MiB, never read by the puller
    source.register("u", [64, 65], 32)
    ctx = zmq.Context()
    try:
        stalled = _raw_puller(ctx, source.endpoint, RCVHWM=1, RCVBUF=1 << 16)
        _pull(stalled, 1, "t", 0, 64, lay, frame_bytes=8 << 20)
        frames = 64 * lay.block_nbytes // (8 << 20)
        deadline = time.monotonic() + 10
        while True:                                       # wait until the frames are queued
            trackers = list(source._plane.sends.get("t", []))
            if len(trackers) == frames:
                trackers = [t for t in trackers if not t.done]
                break
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert trackers, "the puller absorbed every frame: nothing was left queued"
        source.release("t")
        assert all(t.done for t in trackers), "frames still queued after release()"
        assert "resetting the socket" in caplog.text
        assert source.num_registered == 1
        pool = empty_pool(lay, 4)                         # the source still serves others
        sink = closing(create_sink(cfg, pool, lay))
        sink.start_pull("p", source.register("v", [64, 65], 32), [2, 3])
        r = wait_result(sink)
        assert r.ok, r.error
        assert same_blocks(pool, lay, [2, 3], [64, 65], 66, 6)
    finally:
        ctx.destroy(linger=0)


class _FakeContextWorker:
    """A raw ROUTER that plays the context worker by hand, polling the sink while it waits."""

    def __init__(self, ctx, sink):
        self.sink = sink
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.ident = None

    def request(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not self.router.poll(5):
            assert self.sink.poll() == [], "the pull finished while the source said nothing"
            assert time.monotonic() < deadline, "no request from the sink"
        self.ident, *frames = self.router.recv_multipart()
        return messages.decode_request(frames)

    def send(self, *frames):
        self.router.send_multipart([self.ident, *frames])

    def answer(self, msg, *data):
        self.send(*messages.encode(msg), *data)


@pytest.mark.timeout(60)
def test_sink_drops_stray_and_malformed_answers_and_fails_a_wrong_sized_frame(closing):
    cfg = CacheTransceiverConfig(backend="ZMQ", kv_transfer_timeout_ms=20_000)
    pool = empty_pool(LAYOUT, 4)
    sink = closing(create_sink(cfg, pool, LAYOUT))
    ctx = zmq.Context()
    try:
        src = _FakeContextWorker(ctx, sink)
        sink.start_pull("p", make_handle("ZMQ", src.endpoint, "t", [0, 1], 20, LAYOUT), [2, 3])
        hello, start = src.request(), src.request()
        assert isinstance(hello, messages.Hello) and isinstance(start, messages.Start)
        src.answer(messages.Welcome(hello.seq, messages.NoInfo()))
        src.answer(messages.Ack(start.seq))
        rnd = src.request()
        assert isinstance(rnd, messages.Round) and rnd.tid == "t" and len(rnd.frames) == 1
        (off, n, tag), = rnd.frames
        assert (off, n) == (0, 2 * LAYOUT.block_nbytes)
        good = bytes(range(256)) * (n // 256)
        src.send(b"junk")                                              # malformed: dropped
        src.send(messages.MAGIC, messages._encoder.encode(["chunk", tag, 0]))   # out of range
        src.answer(messages.Chunk(tag + 1000, n), b"x" * n)            # no such frame: unread
        src.answer(messages.Ack(987654))                               # nobody's request
        src.answer(messages.Chunk(tag, n), good)
        done = src.request()
        assert isinstance(done, messages.Done) and done.tid == "t"
        src.answer(messages.Ack(done.seq))
        r = wait_result(sink)
        assert r.ok, r.error
        assert pool.view(torch.uint8)[2:4].numpy().tobytes() == good and not pool[:2].any()
        sink.start_pull("q", make_handle("ZMQ", src.endpoint, "u", [1], 16, LAYOUT), [0])
        start = src.request()                                          # the peer is cached
        src.answer(messages.Ack(start.seq))
        (_, n, tag), = src.request().frames
        src.answer(messages.Chunk(tag, n), b"x" * (n - 1))             # one byte short
        r = wait_result(sink)
        assert not r.ok and f"frame of {n - 1} bytes" in str(r.error), r.error
        assert f"expected {n}" in str(r.error) and sink.num_active == 0
    finally:
        ctx.destroy(linger=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pool_is_a_clear_error():
    pool = empty_pool(LAYOUT, 4).cuda()
    with pytest.raises(TransferError, match="GPU memory is not supported by the ZMQ"):
        create_sink(CacheTransceiverConfig(backend="ZMQ"), pool, LAYOUT)


def test_token_view_matches_the_pool_layout():
    pool = fill_pool(LAYOUT, 2, 1)
    tokens = token_view(pool.view(torch.uint8).reshape(2, -1), LAYOUT)
    assert torch.equal(tokens[1, 1, 0, 5], pool[1, 1, 0, 5].reshape(-1).view(torch.uint8))
