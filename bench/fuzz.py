"""Frame fuzzing of a live broker: hypothesis-generated frames on its frontend and backend while
canary requests run through real workers; measures what junk costs the broker.

Frames are drawn from near-valid messages (a real message's map with one field replaced by an
arbitrary value, or nested deeply), batches of them, wrong versions, unknown commands, extra
frames and raw bytes. Each goes out on one of a few DEALERs per socket; their answers are read
and dropped. The broker must stay alive and keep serving, its RSS must stay flat and its
``/metrics`` text bounded. Fuzzed ``Ready``s always carry ``slots: 0`` (never a credit), so junk
never takes the canaries' work: stealing work is the authentication suite's subject.

    python -m bench.fuzz --frames 10000        # 10,000 frames on each socket; prints the figures
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Callable, Optional

import click
import msgpack
import zmq
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from broker import protocol as p

# one valid body per command a peer may send, to mutate
CLIENT_TEMPLATES = [
    p.Submit("fz-1", prompt="hello", sampling={"max_tokens": 2, "stop": ["x"]}, timeout_ms=2000),
    p.Submit("fz-2", token_ids=[1, 2, 3], sampling={"max_tokens": 2}, timeout_ms=2000),
    p.Submit("fz-3", messages=[{"role": "user", "content": "hi"}], sampling={"max_tokens": 2}, timeout_ms=2000),
    p.Cancel("fz-1"), p.Ping(5, metrics=False),
]
WORKER_TEMPLATES = [
    p.Ready("fuzz-w", "context", "m", 1, 100, {"backend": "ZMQ", "endpoint": "tcp://127.0.0.1:1"}, 1, 1000),
    p.Heartbeat(10, 0, 1),
    p.ContextDone("fz-1", 1, 9, "x", [1, 2, 3], {"k": 1}),
    p.KvPulled("fz-1", 1, 0.01, 4096), p.Tokens("fz-1", 0, [5, 6], "ab", attempt=1),
    p.Finished("fz-1", 1, "length", 3, 0.1), p.Failed("fz-1", 1, "INTERNAL", "x"), p.Disconnect("x"),
]
NO_CREDIT = {"slots": 0}     # fuzzed Readys never win a dispatch (see the module docstring)

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=24) | st.binary(max_size=24),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=24)


@st.composite
def bodies(draw, templates: list) -> tuple:
    """(command, msgpack body bytes) of a template with one field replaced, added or nested."""
    msg = draw(st.sampled_from(templates))
    body = msg.body()
    if isinstance(msg, p.Ready):
        body.update(NO_CREDIT)
    key = draw(st.sampled_from(sorted(body) + ["zz_extra"]))
    how = draw(st.sampled_from(["value", "deep", "keep", "drop"]))
    if how == "value" and not (isinstance(msg, p.Ready) and key == "slots"):
        body[key] = draw(values)
    elif how == "drop":
        body.pop(key, None)
    packed = msgpack.packb(body, use_bin_type=True)
    if how == "deep":       # the field becomes an array (or map) nested up to 3,000 levels deep
        depth = draw(st.integers(1, 3000))
        opener = draw(st.sampled_from([b"\x91", b"\x81\xa1k"]))
        body.pop(key, None)
        packed = msgpack.packb(body, use_bin_type=True)
        packed = (_grow_map(packed) + msgpack.packb(key) + opener * depth + b"\xc0")
    return msg.CMD, packed


def _grow_map(packed: bytes) -> bytes:
    """A packed fixmap with room for one more entry (appended by the caller)."""
    return bytes([packed[0] + 1]) + packed[1:]


@st.composite
def frames(draw, templates: list) -> list:
    """One ZeroMQ message (without the DEALER's identity) to send."""
    kind = draw(st.sampled_from(["message", "message", "batch", "header", "raw"]))
    if kind == "raw":
        return [draw(st.binary(max_size=64))] * draw(st.integers(1, 2))
    if kind == "batch":
        items = draw(st.lists(bodies(templates), min_size=0, max_size=6))
        parts = [p.header(p.BATCH) + _array_head(len(items))]
        parts += [b"\x92" + msgpack.packb(c) + b for c, b in items]    # [command, body] pairs
        return [b"".join(parts)]
    cmd, body = draw(bodies(templates))
    if kind == "header":      # wrong version, unknown command, or extra frames
        version = draw(st.sampled_from([p.VERSION, b"DSRV2", b"", b"XXXXX"]))
        cmd = draw(st.sampled_from([cmd, 0, 99, 255, p.BATCH]))
        extra = draw(st.lists(st.binary(max_size=8), max_size=2))
        return [version + bytes([cmd]) + body, *extra]
    return [p.header(cmd) + body]


def _array_head(n: int) -> bytes:
    return bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def metrics_bytes(frontend: str) -> int:
    """The size of the broker's Prometheus text, asked for over a Ping."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(frontend)
        sock.send_multipart(p.Ping(424242, metrics=True).encode())
        deadline = time.monotonic() + 10
        while (left := deadline - time.monotonic()) > 0 and sock.poll(int(left * 1000) + 1):
            for m in p.decode_all(sock.recv_multipart()):
                if isinstance(m, p.Pong) and m.nonce == 424242:
                    return len(m.stats["prometheus"])
        raise TimeoutError("the broker did not answer a metrics ping")
    finally:
        sock.close(0)


def fuzz(frontend: str, backend: str, n: int, rng_seed: int = 0, peers: int = 3,
         between: Optional[Callable[[int], None]] = None) -> dict:
    """Send ``n`` fuzzed frames on each socket (interleaved) from ``peers`` DEALERs per socket;
    ``between(i)`` is called every 500 frames. Returns counts of what was sent and answered."""
    ctx = zmq.Context()
    socks = []
    for addr, templates in ((frontend, CLIENT_TEMPLATES), (backend, WORKER_TEMPLATES)):
        for _ in range(peers):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            s.connect(addr)
            socks.append((s, templates))
    counts = {"sent": 0, "answers": 0}

    def drain() -> None:
        for s, _ in socks:
            while True:
                try:
                    s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                counts["answers"] += 1

    both = st.integers(0, peers - 1).flatmap(
        lambda i: st.tuples(st.just(i), frames(CLIENT_TEMPLATES), frames(WORKER_TEMPLATES)))

    @seed(rng_seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(both)
    def one(drawn) -> None:
        i, front_frames, back_frames = drawn
        socks[i][0].send_multipart(front_frames)
        socks[peers + i][0].send_multipart(back_frames)
        counts["sent"] += 1
        if counts["sent"] % 50 == 0:
            drain()
        if between is not None and counts["sent"] % 500 == 0:
            between(counts["sent"])

    try:
        one()
        drain()
        for s, _ in socks[peers:]:      # whatever a fuzzed Ready registered leaves now
            s.send_multipart(p.Disconnect("fuzz done").encode())
        time.sleep(0.2)
        drain()
    finally:
        for s, _ in socks:
            s.close(0)
        ctx.term()
    return counts


class Canaries:
    """Real requests, one after another in a thread, for as long as the fuzzing lasts."""

    def __init__(self, frontend: str):
        self.frontend = frontend
        self.done: list = []
        self.errors: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from client import Client
        with Client(self.frontend, timeout=60) as c:
            i = 0
            while not self._stop.is_set() or not self.done:
                i += 1
                try:
                    r = c.generate(token_ids=[(i + j) % 200 + 1 for j in range(12)], max_tokens=8,
                                   ignore_eos=True)
                    self.done.append(len(r.token_ids))
                except Exception as e:        # recorded: the caller asserts there are none
                    self.errors.append(repr(e))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(120)


def run(n: int, rng_seed: int = 0) -> dict:
    """A deployment (broker, a tiny context and generation worker), canaries, ``n`` frames a
    socket: the figures the issue asks for."""
    from tests.harness import Deployment
    with Deployment() as d:
        d.add_worker("context", "ctx")
        d.add_worker("generation", "gen")
        pid = d.broker.pid
        fuzz(d.frontend, d.backend, 300, rng_seed + 1)          # warm up: first-use allocations
        rss0, metrics0 = rss_bytes(pid), metrics_bytes(d.frontend)
        t0 = time.monotonic()
        with Canaries(d.frontend) as canaries:
            counts = fuzz(d.frontend, d.backend, n, rng_seed)
        seconds = time.monotonic() - t0
        rss1, metrics1 = rss_bytes(pid), metrics_bytes(d.frontend)
        alive = d.broker.poll() is None
        d.wait_idle(60)
        return {"frames_per_socket": counts["sent"], "answers": counts["answers"], "seconds": round(seconds, 1),
                "broker_alive": alive, "rss_before_mb": round(rss0 / 2**20, 1),
                "rss_after_mb": round(rss1 / 2**20, 1), "rss_growth_mb": round((rss1 - rss0) / 2**20, 1),
                "metrics_bytes_before": metrics0, "metrics_bytes_after": metrics1,
                "canaries_done": len(canaries.done), "canary_errors": canaries.errors}


@click.command()
@click.option("--frames", "n", type=int, default=10_000, show_default=True, help="frames on each socket")
@click.option("--seed", "rng_seed", type=int, default=0, show_default=True)
def main(n: int, rng_seed: int) -> None:
    """Fuzz a live broker's two sockets and print what it cost (JSON)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(json.dumps(run(n, rng_seed), indent=1))


if __name__ == "__main__":
    main()
