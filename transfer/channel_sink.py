"""The generation side of the control channel: ``ChannelSink``, a ``KvSink`` for every backend.

Owns the pulls' state machine (hello, start, one round per ``poll()``, done) and one DEALER per
context worker (cached, with a disconnect monitor). It has no thread: ``poll()`` reads every
answer that is there, then advances each pull one step under its ``kv_transfer_timeout_ms``
deadline; the backend's data plane (``planes.SinkPlane``) moves the bytes. It never trusts an
answer: malformed ones are logged and dropped, late ones (an abandoned request's ``seq``, a
cancelled round's frame tag) are dropped, and nothing a peer sends raises out of ``poll()``.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from .base import (KvHandle, KvLayout, KvSink, PullResult, TransferError, TransferTimeout,
                   check_pull, copy_tokens, pool_bytes, token_view)
from .config import CacheTransceiverConfig
from .messages import (MAGIC, MAX_FRAMES, Ack, Chunk, Done, Hello, Malformed, Refused, Round,
                       Start, Welcome, decode_answer, encode)
from .plan import buffer_blocks, plan_rounds, split_frames
from .planes import SinkPlane
from .sockets import tune

log = logging.getLogger(__name__)


@dataclass
class _Peer:
    endpoint: str
    sock: zmq.Socket
    monitor: zmq.Socket
    conn: Any = None               # the plane's connection, once the hello was answered
    hello_seq: Optional[int] = None
    error: Optional[TransferError] = None


@dataclass
class _Pull:
    pull_id: str
    handle: Any                    # KvHandle
    dst_ids: list
    started: float
    deadline: float
    rounds: list
    staged: bool                   # different block sizes: receive into a staging buffer
    state: str = "hello"           # hello -> start -> round -> done -> finished
    acked: bool = False            # the source answered Start
    seq: int = -1
    round_index: int = 0
    op: Any = None
    nbytes: int = 0
    staging: Optional[torch.Tensor] = None
    error: Optional[TransferError] = None


def _discard_rest(sock: zmq.Socket) -> None:
    while sock.getsockopt(zmq.RCVMORE):
        sock.recv(copy=False)


class ChannelSink(KvSink):
    def __init__(self, cfg: CacheTransceiverConfig, pool: torch.Tensor, layout: KvLayout,
                 backend: str, plane: Callable[[torch.Tensor], SinkPlane],
                 devices: tuple = ("cpu",), curve: Any = None) -> None:
        """``curve``: this worker's ``broker.auth.KeyPair``, for sources that run CURVE (their
        public key comes in the KV handle, through the broker)."""
        self.backend = backend
        self._curve = curve
        self._cfg, self._layout = cfg, layout
        self._pool = pool_bytes(pool, layout, backend, devices)
        self._flat = self._pool.reshape(-1)
        self._tokens = token_view(self._pool, layout)
        self._plane = plane(self._pool)
        self._ctx: Optional[zmq.Context] = zmq.Context(io_threads=1)
        self._peers: dict = {}         # endpoint -> _Peer
        self._monitors: dict = {}      # monitor socket -> _Peer
        self._poller = zmq.Poller()
        self._pulls: dict = {}         # pull_id -> _Pull, started and not finished/cancelled
        self._results: list = []
        self._waiting: dict = {}       # seq -> _Pull or _Peer with a request out
        self._seq = itertools.count(1)
        self._tags = itertools.count(1)    # frame tags: unique in this sink, so a late frame
        self.rounds_done = 0               # is never taken for a new one; rounds, for tests

    # -- the contract --------------------------------------------------------------------------

    def start_pull(self, pull_id: str, handle: dict, dest_block_ids: list) -> None:
        h, dst = check_pull(pull_id, handle, dest_block_ids, self.backend, self._layout,
                            self._pool.shape[0], self._pulls, self._check_handle, self.worker_id)
        staged = h.layout.block_size != self._layout.block_size
        per_round = buffer_blocks(self._cfg.buffer_tokens(self._layout.block_size),
                                  h.layout.block_size)
        rounds = plan_rounds(h.block_ids, None if staged else dst, per_round)
        now = time.monotonic()
        pull = _Pull(pull_id, h, dst, now, now + self._cfg.timeout_s, rounds, staged)
        self._pulls[pull_id] = pull
        self._step(pull)

    def _check_handle(self, handle: dict, h: KvHandle) -> None:
        if not h.endpoint.startswith("tcp://"):
            raise TransferError(f"malformed KV handle: endpoint={h.endpoint!r} is not tcp://")
        self._plane.check_handle(handle, h)

    def poll(self) -> list:
        self._pump()
        for pull in list(self._pulls.values()):
            self._step(pull)
        out, self._results = self._results, []
        return out

    def cancel(self, pull_id: str) -> None:
        pull = self._pulls.pop(pull_id, None)
        if pull is not None:
            self._abandon(pull)

    @property
    def num_active(self) -> int:
        return len(self._pulls)

    def close(self) -> None:
        if self._ctx is None:
            return
        for pull in list(self._pulls.values()):
            self._abandon(pull)
        self._pulls.clear()
        for peer in list(self._peers.values()):
            self._forget(peer)
        self._plane.close()
        self._ctx.destroy(linger=0)
        self._ctx = None

    # -- control channel -----------------------------------------------------------------------

    def _peer(self, endpoint: str, server_key: str = "") -> _Peer:
        peer = self._peers.get(endpoint)
        if peer is None:
            if server_key and self._curve is None:
                raise TransferError(f"the context worker at {endpoint} runs CURVE on its KV channel "
                                    "but this generation worker has no key pair (--curve-key)")
            sock = tune(self._ctx.socket(zmq.DEALER))
            if server_key:
                try:
                    sock.curve_secretkey, sock.curve_publickey = self._curve.secret, self._curve.public
                    sock.curve_serverkey = server_key.encode()
                except (zmq.ZMQError, UnicodeEncodeError) as exc:
                    sock.close(linger=0)
                    raise TransferError(f"malformed KV handle: curve_key={server_key!r}: {exc}") from None
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            if "://[" in endpoint:               # an IPv6 context worker
                sock.setsockopt(zmq.IPV6, 1)
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            sock.connect(endpoint)
            peer = self._peers[endpoint] = _Peer(endpoint, sock, monitor)
            self._monitors[monitor] = peer
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(monitor, zmq.POLLIN)
        return peer

    def _forget(self, peer: _Peer) -> None:
        self._waiting = {s: w for s, w in self._waiting.items() if w is not peer}
        self._peers.pop(peer.endpoint, None)
        self._monitors.pop(peer.monitor, None)
        for sock in (peer.sock, peer.monitor):
            self._poller.unregister(sock)
            sock.close(linger=0)
        if peer.conn is not None:
            try:
                self._plane.forget(peer.conn)
            except Exception:
                log.exception("KV sink: forgetting the context worker at %s", peer.endpoint)
            peer.conn = None

    def _request(self, peer: _Peer, waiter: Any, kind: type, *fields: Any) -> int:
        seq = next(self._seq)
        self._waiting[seq] = waiter
        try:
            peer.sock.send_multipart(encode(kind(seq, *fields)), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            raise TransferError(f"cannot send to the context worker at {peer.endpoint}: {exc}")
        return seq

    def _pump(self) -> None:
        """Read every answer and disconnect event that is there, without waiting."""
        if not self._peers:
            return
        for sock, _ in self._poller.poll(0):
            if sock.closed:                       # its peer was forgotten a moment ago
                continue
            if sock in self._monitors:
                self._on_monitor(sock)
                continue
            for _ in range(256):                  # bounded: deadlines are checked in between
                try:
                    head = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    if head != MAGIC or not sock.getsockopt(zmq.RCVMORE):
                        raise Malformed("bad framing")
                    msg = decode_answer(sock.recv())
                    if isinstance(msg, Chunk) != bool(sock.getsockopt(zmq.RCVMORE)):
                        raise Malformed(f"{type(msg).__name__} with the wrong number of frames")
                    if isinstance(msg, Chunk):
                        self._plane.receive(sock, msg)
                    else:
                        self._on_answer(msg)
                except (Malformed, TransferError) as exc:
                    log.warning("KV sink: dropped a malformed answer (%s)", exc)
                _discard_rest(sock)

    def _on_answer(self, msg: Any) -> None:
        waiter = self._waiting.get(msg.seq)
        if isinstance(waiter, _Peer):
            del self._waiting[msg.seq]
            self._on_welcome(waiter, msg)
        elif isinstance(waiter, _Pull) and self._pulls.get(waiter.pull_id) is waiter:
            current = msg.seq == waiter.seq
            if current:
                del self._waiting[msg.seq]
            if isinstance(msg, Refused):
                waiter.error = TransferError(msg.error)
            elif not current or not isinstance(msg, Ack):
                return                            # answers to Round are refusals only
            elif waiter.state == "start":
                waiter.acked = True
            elif waiter.state == "done":
                waiter.state = "finished"

    def _on_welcome(self, peer: _Peer, msg: Any) -> None:
        peer.hello_seq = None
        if isinstance(msg, Refused):
            peer.error = TransferError(msg.error)
        elif not isinstance(msg, Welcome) or not isinstance(msg.info, self._plane.info_type):
            peer.error = TransferError(
                f"the context worker at {peer.endpoint} answered hello with {msg!r:.200}, "
                f"expected {self._plane.info_type.__name__} of the {self.backend} backend")
        else:
            try:
                peer.conn = self._plane.connect(peer.endpoint, msg.info)
            except TransferError as exc:
                peer.error = exc

    def _on_monitor(self, monitor: zmq.Socket) -> None:
        peer = self._monitors[monitor]
        lost = refused = False
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            lost |= event == zmq.EVENT_DISCONNECTED
            refused |= event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        if not (lost or refused):
            return
        for pull in self._pulls.values():
            if pull.handle.endpoint == peer.endpoint and pull.error is None:
                pull.error = TransferError(
                    f"the context worker at {peer.endpoint} refused this worker's CURVE key "
                    f"(not among its --curve-peers) for KV transfer {pull.handle.transfer_id!r}"
                    if refused else
                    f"lost the connection to the context worker at {peer.endpoint} during the "
                    f"KV transfer {pull.handle.transfer_id!r} (it died or stalled)")
        self._forget(peer)

    # -- one pull's state machine --------------------------------------------------------------

    def _step(self, pull: _Pull) -> None:
        if pull.error is None:
            try:
                self._advance(pull)
            except TransferError as exc:
                pull.error = exc
        if pull.error is not None:
            return self._finish(pull, pull.error)
        if pull.state == "finished":
            return self._finish(pull, None)
        if time.monotonic() >= pull.deadline:
            self._finish(pull, TransferTimeout(
                f"KV transfer timed out: pull {pull.pull_id!r} of transfer "
                f"{pull.handle.transfer_id!r} from the context worker at {pull.handle.endpoint} "
                f"did not finish within kv_transfer_timeout_ms="
                f"{round(self._cfg.timeout_s * 1000)} ({pull.nbytes} bytes received, "
                f"state {pull.state})"))

    def _advance(self, pull: _Pull) -> None:
        h = pull.handle
        if pull.state in ("hello", "start"):
            peer = self._peer(h.endpoint, h.curve_key)
            if peer.error is not None:
                error = peer.error
                self._forget(peer)                # the next pull asks again
                raise error
            if peer.conn is None and peer.hello_seq is None:
                peer.hello_seq = self._request(peer, peer, Hello, self._plane.info())
            if pull.state == "hello":             # Start goes right behind Hello: the
                pull.state = "start"              # source's clock starts at once
                pull.seq = self._request(peer, pull, Start, h.transfer_id)
            if not pull.acked or peer.conn is None:
                return
            try:
                if not self._plane.connected(peer.conn):
                    return
            except TransferError:
                self._forget(peer)
                raise
            pull.state = "round"
        if pull.state != "round":
            return
        if pull.op is None:                       # one round per poll: the worker loop and
            self._post_round(pull)                # other pulls get their turn in between
        if self._plane.test(pull.op):
            pull.op = None
            rnd = pull.rounds[pull.round_index]
            if pull.staged:
                self._scatter(pull, rnd)
            pull.nbytes += rnd.count * h.layout.block_nbytes
            self.rounds_done += 1
            pull.round_index += 1
            if pull.round_index == len(pull.rounds):
                pull.state = "done"
                pull.seq = self._request(self._peers[h.endpoint], pull, Done, h.transfer_id)

    def _post_round(self, pull: _Pull) -> None:
        h, rnd = pull.handle, pull.rounds[pull.round_index]
        src_bnb = h.layout.block_nbytes
        if pull.staged:
            if pull.staging is None:
                most = max(r.count for r in pull.rounds)
                pull.staging = self._plane.staging(most * src_bnb)
            dst, dst_bnb = pull.staging, src_bnb
        else:
            dst, dst_bnb = self._flat, self._layout.block_nbytes
        frames = [(f.src, f.dst, f.nbytes, next(self._tags))
                  for f in split_frames(rnd.segments, src_bnb, dst_bnb, self._plane.frame_bytes)]
        peer = self._peers[h.endpoint]
        pull.op = self._plane.post(peer.conn, frames, dst)
        if self._plane.push:
            for i in range(0, len(frames), MAX_FRAMES):
                self._request(peer, pull, Round, h.transfer_id,
                              [(s, n, t) for s, _, n, t in frames[i:i + MAX_FRAMES]])

    def _scatter(self, pull: _Pull, rnd: Any) -> None:
        src = pull.handle.layout
        staged = token_view(pull.staging[:rnd.count * src.block_nbytes].view(rnd.count, -1), src)
        t0 = rnd.first * src.block_size
        t1 = min((rnd.first + rnd.count) * src.block_size, pull.handle.num_tokens)
        copy_tokens(self._tokens, pull.dst_ids, staged, lambda i: i - rnd.first,
                    t0, t1, src.block_size, self._layout.block_size)

    def _abandon(self, pull: _Pull) -> None:
        """Stop the pull's data movement and forget its requests (answers arriving later are
        dropped by their seq)."""
        if pull.op is not None:
            op, pull.op = pull.op, None
            self._plane.cancel(op)
        if pull.staging is not None:
            self._plane.unstage(pull.staging)
            pull.staging = None
        self._waiting = {s: w for s, w in self._waiting.items() if w is not pull}

    def _finish(self, pull: _Pull, error: Optional[TransferError]) -> None:
        if self._pulls.get(pull.pull_id) is not pull:
            return
        del self._pulls[pull.pull_id]
        self._abandon(pull)
        self._results.append(PullResult(pull.pull_id, error is None, error, pull.nbytes,
                                        time.monotonic() - pull.started))
