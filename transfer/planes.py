"""The contract of a transfer backend's data plane: what a backend writes to move KV bytes under
the shared control channel (``channel.py``).

A plane only moves bytes; the channel does everything else (requests, deadlines, registrations,
refusals). Pull planes (NIXL, SHM) read the source's memory one-sidedly between Start and Done;
push planes (ZMQ, UCX, MPI) have the source send each Round's byte ranges. What two planes swap
to connect are the info structs of ``messages.py``. This module does no I/O.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import zmq

from .base import KvHandle, TransferError
from .messages import Chunk, NoInfo

RELEASE_WAIT_S = 2.0               # release()/cancel(): bound on waiting for in-flight operations


class SourceLink:
    """What the channel lends its source plane (``ChannelSource`` is one); channel thread only."""

    def send(self, peer: bytes, msg: Any, data: Any = None) -> Optional[zmq.MessageTracker]:
        """One message to ``peer``, then ``data`` sent without copying: ZeroMQ reads it until
        the returned tracker is done."""
        raise NotImplementedError

    def reset(self) -> None:
        """Drop every frame still queued to any peer (their pulls then fail fast)."""
        raise NotImplementedError


class SourcePlane:
    """Context side of a data plane; every call comes from the channel thread."""

    push = False
    spin = False          # progress without sleeping while busy (the sender moves the bytes)
    tick = True           # progress every 1 ms while a transfer runs (its library needs the
                          # target's progress calls: NIXL, UCX, MPI); False: only when busy
    peer_info_type: type = NoInfo     # what a sink's Hello must carry

    def attach(self, link: SourceLink) -> None:
        """The channel is up: ``link`` sends on it (for a plane whose bytes travel there)."""

    def handle_extra(self) -> dict:
        """Extra keys for the KV handle (e.g. the SHM host id)."""
        return {}

    def hello(self, peer: bytes, info: Any) -> Any:
        """What a new sink needs to reach this pool (a ``messages`` info struct)."""
        return NoInfo()

    def serve(self, peer: bytes, tid: str, frames: list) -> None:
        """Push planes: send ``[(src_off, nbytes, tag), ...]`` of the pool to ``peer``."""
        raise TransferError("this backend does not push")

    def busy(self) -> bool:
        """True while operations are in flight (the thread then progresses every 1 ms)."""
        return False

    def progress(self) -> None: ...

    def drop(self, tid: str) -> None:
        """Stop reading the blocks of ``tid`` (bounded): cancel or finish its sends; raise
        TransferError if they may still be read."""

    def close(self) -> None: ...


class SinkPlane:
    """Generation side of a data plane; every call comes from the owner's thread."""

    push = False
    device = "cpu"
    frame_bytes = 1 << 62            # the largest byte range one frame of a round may move
    info_type: type = NoInfo         # what the source's Welcome must carry

    def info(self) -> Any:
        """What this sink tells a source in its Hello (a ``messages`` info struct)."""
        return NoInfo()

    def check_handle(self, handle: dict, h: KvHandle) -> None:
        """Backend-specific checks of a KV handle before a pull starts (raise TransferError)."""

    def connect(self, endpoint: str, info: Any) -> Any:
        """A connection to the source at ``endpoint`` (may still be in progress; not None)."""
        return endpoint

    def connected(self, conn: Any) -> bool:
        """True once usable; raises TransferError if connecting failed."""
        return True

    def forget(self, conn: Any) -> None:
        """The peer is gone (or restarted): drop what was cached for it."""

    def staging(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def unstage(self, buf: torch.Tensor) -> None: ...

    def post(self, conn: Any, frames: list, dst: torch.Tensor) -> Any:
        """Start moving ``frames`` (``[(src_off, dst_off, nbytes, tag)]``) into ``dst`` (flat
        uint8); returns an operation for ``test``/``cancel``."""
        raise NotImplementedError

    def receive(self, sock: zmq.Socket, chunk: Chunk) -> None:
        """A frame of KV bytes arrived on the control channel; its bytes are the next part of
        ``sock``'s message (what is left unread is discarded)."""
        raise TransferError(f"the {type(self).__name__} data plane takes no KV bytes on the "
                            "control channel")

    def test(self, op: Any) -> bool:
        """True when the operation finished; raises TransferError if it failed."""
        raise NotImplementedError

    def cancel(self, op: Any) -> None:
        """Once it returns, the operation writes nothing any more."""

    def close(self) -> None: ...
