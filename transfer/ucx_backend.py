"""The UCX transfer backend, through UCXX (the maintained successor of the archived ucx-py).

Fast path only: the two workers swap UCX worker addresses on the control channel's Hello
(``channel.py``) and each creates an endpoint to the other with endpoint error handling off (the
listener API would fall back to TCP). Per round the generation side posts one tagged receive per
frame straight into its blocks (or a staging buffer when the block sizes differ), then asks the
context side, whose channel thread posts the matching tagged sends from the pool; on one host
UCX moves them with a zero-copy rendezvous read (CMA). The sink progresses its UCX worker from
``poll()``; the source's channel thread progresses its own. Host and CUDA memory (UCX's CUDA
transports) go through the same calls. Dead peers are detected by the control channel and the
deadline: UCX calls here never block.
"""
from __future__ import annotations

import logging
import os
import time

os.environ.setdefault("UCX_MODULES", "^efa")
import torch                                                          # noqa: E402
import ucxx._lib.libucxx as ucx                                       # noqa: E402
from ucxx._lib.arr import Array                                       # noqa: E402

from .base import TransferError                                      # noqa: E402
from .channel import channel_backend                                 # noqa: E402
from .messages import UcxInfo                                        # noqa: E402
from .planes import RELEASE_WAIT_S, SinkPlane, SourcePlane           # noqa: E402

log = logging.getLogger(__name__)
BACKEND = "UCX"


def _worker() -> tuple:
    try:
        ctx = ucx.UCXContext({}, (ucx.Feature.TAG,))
        return ctx, ucx.UCXWorker(ctx)
    except Exception as exc:
        raise TransferError(f"cannot start a UCX worker: {exc}") from exc


def _endpoint(worker, address: bytes):
    addr = ucx.UCXAddress.create_from_buffer(bytes(address))
    return ucx.UCXEndpoint.create_from_worker_address(worker, addr, False)


def _array(t: torch.Tensor) -> Array:
    return Array(t.numpy() if t.device.type == "cpu" else t)


def _failed(req) -> str | None:
    try:
        req.check_error()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _settle(worker, reqs: list, seconds: float) -> bool:
    """Progress until every request completed (True) or ``seconds`` passed (False)."""
    deadline = time.monotonic() + seconds
    while not all(r.completed for r in reqs):
        if time.monotonic() > deadline:
            return False
        worker.progress()
    return True


class UcxSourcePlane(SourcePlane):
    push = True
    peer_info_type = UcxInfo

    def __init__(self, pool: torch.Tensor) -> None:
        self.ctx, self.worker = _worker()
        self.flat = pool.reshape(-1)
        self.eps: dict = {}            # sink identity -> endpoint
        self.sends: dict = {}          # tid -> [request]

    def hello(self, peer: bytes, info: UcxInfo) -> UcxInfo:
        try:
            self.eps[peer] = _endpoint(self.worker, info.address)
        except Exception as exc:
            raise TransferError(f"cannot reach the generation worker's UCX worker: {exc}")
        return UcxInfo(self.worker.address.tobytes())

    def serve(self, peer: bytes, tid: str, frames: list) -> None:
        ep = self.eps.get(peer)
        if ep is None:
            raise TransferError("no UCX endpoint for this generation worker: say hello first")
        reqs = self.sends.setdefault(tid, [])
        for off, n, tag in frames:
            reqs.append(ep.tag_send(_array(self.flat[off:off + n]), ucx.UCXXTag(tag)))

    def busy(self) -> bool:
        return bool(self.sends)

    def progress(self) -> None:
        self.worker.progress()
        for tid, reqs in list(self.sends.items()):
            if all(r.completed for r in reqs):
                del self.sends[tid]
                errors = [e for e in map(_failed, reqs) if e]
                if errors:
                    log.info("UCX: sends of transfer %r failed: %s", tid, errors[0])

    def drop(self, tid: str) -> None:
        reqs = self.sends.pop(tid, [])
        if reqs and not _settle(self.worker, reqs, RELEASE_WAIT_S):
            # a receiver that stopped reading: nothing moves our bytes any more
            self.worker.cancel_inflight_requests()
            _settle(self.worker, reqs, RELEASE_WAIT_S)

    def close(self) -> None:
        self.worker.cancel_inflight_requests()
        self.eps.clear()


class UcxSinkPlane(SinkPlane):
    push = True
    frame_bytes = 1 << 30
    info_type = UcxInfo

    def __init__(self, pool: torch.Tensor) -> None:
        self.device = pool.device.type
        self.ctx, self.worker = _worker()

    def info(self) -> UcxInfo:
        return UcxInfo(self.worker.address.tobytes())

    def connect(self, endpoint: str, info: UcxInfo):
        try:
            return _endpoint(self.worker, info.address)
        except Exception as exc:
            raise TransferError(f"cannot reach the UCX worker of the context worker at "
                                f"{endpoint}: {exc}") from exc

    def post(self, conn, frames: list, dst: torch.Tensor) -> list:
        return [conn.tag_recv(_array(dst[d:d + n]), ucx.UCXXTag(tag)) for _, d, n, tag in frames]

    def test(self, op: list) -> bool:
        self.worker.progress()
        if not all(r.completed for r in op):
            return False
        for req in op:
            error = _failed(req)
            if error:
                raise TransferError(f"UCX receive from the context worker failed: {error}")
        return True

    def cancel(self, op: list) -> None:
        if not _settle(self.worker, op, 0.0):
            self.worker.cancel_inflight_requests()
            if not _settle(self.worker, op, RELEASE_WAIT_S):
                log.error("UCX: receives still in flight after cancelling them")

    def close(self) -> None:
        self.worker.cancel_inflight_requests()


make_source, make_sink = channel_backend(BACKEND, UcxSourcePlane, UcxSinkPlane,
                                         devices=("cpu", "cuda"))
