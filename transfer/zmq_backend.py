"""The ZMQ transfer backend: KV bytes as ZeroMQ frames on the control channel itself. Always
available (no library beyond pyzmq), host memory only.

A push data plane under the channel of ``channel.py``: per round the generation side expects a
set of tagged frames (1-16 MiB: big enough to amortise, small enough to pipeline copies with the
network) and sends a Round; the context side's channel thread answers with one ``Chunk`` header
and the raw bytes per frame, sent straight from the pool (``copy=False``, tracked so that a
release can wait until ZeroMQ no longer reads them), and the sink receives each frame with
``recv_into`` straight into its pool (same block size) or into the staging buffer the channel
scatters token-wise (different block sizes). A frame whose tag no posted round expects (a
cancelled or timed-out pull's) is dropped unread.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import numpy as np
import torch
import zmq

from .base import TransferError
from .channel import channel_backend
from .messages import MAX_MESSAGE_BYTES, Chunk
from .planes import RELEASE_WAIT_S, SinkPlane, SourceLink, SourcePlane

log = logging.getLogger(__name__)
BACKEND = "ZMQ"
FRAME_BYTES = min(8 << 20, MAX_MESSAGE_BYTES)   # a larger frame would drop the connection


def _sent(trackers: list, seconds: float) -> bool:
    """Wait, bounded, until ZeroMQ no longer reads any of these frames."""
    deadline = time.monotonic() + seconds
    try:
        for tracker in trackers:
            tracker.wait(max(0.0, deadline - time.monotonic()))
    except zmq.NotDone:
        return False
    return True


class ZmqSourcePlane(SourcePlane):
    push = True
    tick = False                                  # ZeroMQ's I/O thread moves the bytes

    def __init__(self, pool: torch.Tensor) -> None:
        self.flat = pool.reshape(-1).numpy()      # shares the pool's memory
        self.sends: dict = {}                     # tid -> [tracker] of frames handed to ZeroMQ
        self.link: Optional[SourceLink] = None

    def attach(self, link: SourceLink) -> None:
        self.link = link

    def serve(self, peer: bytes, tid: str, frames: list) -> None:
        sent = self.sends.setdefault(tid, [])
        try:
            for off, n, tag in frames:
                sent.append(self.link.send(peer, Chunk(tag, n),
                                           memoryview(self.flat[off:off + n])))
        except zmq.ZMQError as exc:               # the sink went away: its pull fails there
            raise TransferError(f"cannot send transfer {tid!r} to the generation worker: "
                                f"{exc}") from exc

    def progress(self) -> None:
        for tid in [t for t, trackers in self.sends.items() if all(x.done for x in trackers)]:
            del self.sends[tid]

    def drop(self, tid: str) -> None:
        trackers = self.sends.pop(tid, [])
        if _sent(trackers, RELEASE_WAIT_S):
            return
        log.warning("ZMQ: frames of transfer %r still queued after %.1f s; resetting the socket "
                    "to drop them", tid, RELEASE_WAIT_S)
        self.link.reset()
        if not _sent(trackers, RELEASE_WAIT_S):
            raise TransferError(f"could not stop sending transfer {tid!r}; do not reuse its "
                                "blocks")

    def close(self) -> None:                      # after the channel closed its socket
        if not _sent([t for ts in self.sends.values() for t in ts], RELEASE_WAIT_S):
            log.error("ZMQ: a frame is still queued after close")
        self.sends.clear()


class _Receive:
    """One round's expected frames: tag -> (offset in ``dst``, nbytes)."""

    def __init__(self, dst: np.ndarray, frames: list) -> None:
        self.dst = dst
        self.frames = {tag: (d, n) for _, d, n, tag in frames}
        self.left = len(frames)
        self.error: Optional[TransferError] = None


class ZmqSinkPlane(SinkPlane):
    push = True
    frame_bytes = FRAME_BYTES

    def __init__(self, pool: torch.Tensor) -> None:
        self.expected: dict = {}                  # tag -> _Receive

    def post(self, conn: Any, frames: list, dst: torch.Tensor) -> _Receive:
        op = _Receive(dst.numpy(), frames)
        self.expected.update(dict.fromkeys(op.frames, op))
        return op

    def receive(self, sock: zmq.Socket, chunk: Chunk) -> None:
        op = self.expected.pop(chunk.tag, None)
        if op is None:
            return                                # a cancelled round's frame: dropped unread
        d, n = op.frames[chunk.tag]
        got = sock.recv_into(memoryview(op.dst[d:d + n])) if chunk.nbytes == n else chunk.nbytes
        if got != n:
            op.error = TransferError(f"the context worker sent a frame of {got} bytes for tag "
                                     f"{chunk.tag}, expected {n}")
        op.left -= 1

    def test(self, op: _Receive) -> bool:
        if op.error is not None:
            raise op.error
        return op.left == 0

    def cancel(self, op: _Receive) -> None:
        for tag in op.frames:
            self.expected.pop(tag, None)


make_source, make_sink = channel_backend(BACKEND, ZmqSourcePlane, ZmqSinkPlane)
