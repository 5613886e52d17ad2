"""Null workers: the real worker protocol with no model and no KV, to measure the broker alone.

A null context worker answers ``Prefill`` at once with ``ContextDone`` (a fixed first token, the
prompt's token ids, a dummy ``kv_handle``); a null generation worker answers ``Decode`` with
``KvPulled`` (a fake transfer of zero bytes), one ``Tokens`` message per remaining token (as the
real engine sends them, one per decode step) but the last, and ``Finished`` carrying the last. ``max_tokens`` in the request's
sampling parameters sets the output length. Every message is built and read with
``broker.protocol``; nothing else crosses the socket.

Several null workers share one process and one poll loop (one DEALER each), so the benchmark's
processes stay few on a small machine:

    python -m bench.null_worker --broker tcp://127.0.0.1:5556 --role context --role generation
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Optional

import zmq

from bench.common import parse_cpus, quiet_gc, recv_frames, send_frames
from broker import protocol as p

FIRST_TOKEN = 42
NEXT_TOKEN = 43


class NullWorker:
    """One null worker's protocol logic: messages in, replies out. Does no I/O."""

    def __init__(self, role: str, worker_id: str, slots: int = 100_000, heartbeat_ms: int = 1000,
                 held: Optional[set] = None):
        if role not in ("context", "generation", "both"):
            raise ValueError(f"invalid role {role!r}: expected context, generation or both")
        self.role, self.worker_id, self.slots, self.heartbeat_ms = role, worker_id, slots, heartbeat_ms
        # request#attempt keys of the KV that null context workers "hold": the fake transfer's
        # registry, shared by the null workers of one process. A generation worker's pull
        # removes the key (as a real context worker frees its blocks when the pull completes);
        # KvRelease and CancelWork remove it too.
        self.leases: set = held if held is not None else set()
        self.served = 0

    def ready(self) -> p.Ready:
        return p.Ready(self.worker_id, self.role, "null", self.slots, kv_blocks=1_000_000,
                       transfer={"backend": "NULL", "endpoint": ""}, pid=os.getpid(),
                       heartbeat_ms=self.heartbeat_ms)

    def heartbeat(self) -> p.Heartbeat:
        held = len(self.leases) if self.role != "generation" else 0
        return p.Heartbeat(free_blocks=1_000_000, leases=held)

    def on_message(self, msg: p.Message) -> list:
        if isinstance(msg, p.Prefill):
            # the prompt's ids go back as they came (TokenIds, still packed): no work per id
            ids = msg.token_ids if msg.token_ids is not None else [1]
            n = _max_tokens(msg.sampling)
            finish = p.Finish.LENGTH if n <= 1 else None
            key = f"{msg.request_id}#{msg.attempt}"
            if finish is None:
                self.leases.add(key)
            self.served += 1
            return [p.ContextDone(msg.request_id, msg.attempt, FIRST_TOKEN, "x", ids,
                                  {"backend": "NULL", "key": key}, finish, 0.0)]
        if isinstance(msg, p.Decode):
            n = _max_tokens(msg.sampling)
            rid, att = msg.request_id, msg.attempt
            key = msg.kv_handle.get("key") if isinstance(msg.kv_handle, dict) else None
            self.leases.discard(key)          # the fake pull: the context side frees the "KV"
            out: list = [p.KvPulled(rid, att, 0.0, 0)]
            out.extend(p.Tokens(rid, i, [NEXT_TOKEN], "y", att) for i in range(1, n - 1))
            last = ([NEXT_TOKEN], "y") if n > 1 else ([], "")    # the last token rides in Finished
            out.append(p.Finished(rid, att, p.Finish.LENGTH, len(msg.prompt_token_ids), 0.0, n - 1, *last))
            self.served += 1
            return out
        if isinstance(msg, p.Generate):
            n = _max_tokens(msg.sampling)
            rid, att = msg.request_id, msg.attempt
            ids = msg.token_ids if msg.token_ids is not None else [1]
            out = [p.Tokens(rid, i, [FIRST_TOKEN if i == 0 else NEXT_TOKEN], "x", att) for i in range(n - 1)]
            out.append(p.Finished(rid, att, p.Finish.LENGTH, len(ids), 0.0, n - 1,
                                  [FIRST_TOKEN if n == 1 else NEXT_TOKEN], "x"))
            self.served += 1
            return out
        if isinstance(msg, (p.KvRelease, p.CancelWork)):
            self.leases.discard(f"{msg.request_id}#{msg.attempt}")
            return []
        if isinstance(msg, p.Reconnect):
            self.leases.clear()
            return [self.ready()]
        return []   # BrokerHeartbeat: any message is a sign of life; nothing to answer


def _max_tokens(sampling: dict) -> int:
    if not isinstance(sampling, dict):
        return 1
    n = sampling.get("max_tokens") or sampling.get("default_max_tokens", p.SamplingParams.default_max_tokens)
    return n if isinstance(n, int) and n >= 1 else 1


def serve(broker: str, workers: list, stop_after: Optional[float] = None,
          should_stop=lambda: False, curve=None) -> None:
    """Run the null workers against the broker's backend until ``should_stop()`` or
    ``stop_after`` seconds; each sends Ready, heartbeats from the loop, and Disconnect at the end.
    ``curve``: a ``broker.auth.CurveClient`` for a broker with CURVE."""
    ctx = zmq.Context()
    socks = []
    poller = zmq.Poller()
    for w in workers:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 1_000_000)
        s.setsockopt(zmq.RCVHWM, 1_000_000)
        if curve is not None:
            curve.apply(s)
        s.connect(broker)
        s.send_multipart(w.ready().encode())
        socks.append((s, w))
        poller.register(s, zmq.POLLIN)
    by_sock = dict(socks)
    quiet_gc()
    beat = min(w.heartbeat_ms for w in workers) / 1000
    next_beat = time.monotonic() + beat
    end = time.monotonic() + stop_after if stop_after else float("inf")
    try:
        while not should_stop() and time.monotonic() < end:
            for s, _ in poller.poll(max(1, int((next_beat - time.monotonic()) * 1000))):
                w = by_sock[s]
                for _ in range(10_000):
                    frames = recv_frames(s)
                    if frames is None:
                        break
                    try:
                        msgs = p.decode_all(frames)
                    except p.ProtocolError as e:
                        msgs = [e]
                    replies: list = []
                    for msg in msgs:
                        if isinstance(msg, p.ProtocolError):
                            print(f"null worker {w.worker_id}: dropping malformed message: {msg}", file=sys.stderr)
                            continue
                        replies.extend(w.on_message(msg))
                    # the replies to one batch as one batch, as a real worker sends one per step
                    for frames in p.encode_batches(replies):
                        send_frames(s, frames)   # HWM 1,000,000: Again would be a bug
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + beat
                for s, w in socks:
                    s.send_multipart(w.heartbeat().encode())
    finally:
        for s, w in socks:
            try:
                s.send_multipart(p.Disconnect("null worker stopping").encode(), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            s.close(0)
        ctx.term()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.null_worker",
                                 description="Null workers (no model, no KV) for broker benchmarks.")
    ap.add_argument("--broker", required=True, metavar="tcp://HOST:PORT", help="the broker's backend address")
    ap.add_argument("--role", action="append", choices=["context", "generation", "both"], required=True,
                    help="one null worker of this role (repeatable)")
    ap.add_argument("--slots", type=int, default=100_000, help="slots each worker offers (default: 100000)")
    ap.add_argument("--heartbeat-ms", type=int, default=1000, help="heartbeat interval (default: 1000)")
    ap.add_argument("--max-seconds", type=float, default=3600,
                    help="stop after this many seconds in any case (default: 3600)")
    ap.add_argument("--cpus", type=parse_cpus, default=None, metavar="LIST",
                    help="run only on these CPUs, e.g. 1 or 0,2-3 (default: any)")
    ap.add_argument("--curve-key", default=None, help="CURVE key pair (NAME.key_secret) of the workers")
    ap.add_argument("--curve-server-key", default=None, help="the broker's CURVE public key")
    args = ap.parse_args(argv)
    from broker.auth import curve_client
    curve = curve_client(args.curve_key, args.curve_server_key)
    if args.cpus:
        os.sched_setaffinity(0, args.cpus)    # before any thread starts: they all inherit it
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    held: set = set()
    workers = [NullWorker(r, f"null-{r}-{i}-{os.getpid()}", args.slots, args.heartbeat_ms, held)
               for i, r in enumerate(args.role)]
    print(f"null workers ready pid={os.getpid()} roles={','.join(args.role)}", flush=True)
    parent = os.getppid()      # a benchmark that died without stopping us: stop too
    serve(args.broker, workers, args.max_seconds, lambda: bool(stop) or os.getppid() != parent, curve)
    return 0


if __name__ == "__main__":
    sys.exit(main())
