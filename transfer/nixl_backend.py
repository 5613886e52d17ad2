"""The NIXL transfer backend: one-sided RDMA-style READ of the context worker's registered pool.

The context worker registers its whole KV pool with a NIXL agent once; the generation worker's
agent loads the context agent's metadata once per peer (over the control channel in
``channel.py``, as raw bytes) and READs each round's merged block segments straight into its own
blocks (or into a registered staging buffer when the block sizes differ). Agents run without
NIXL's progress thread (it halves bandwidth on 2 cores): the sink polls ``check_xfer_state``
from ``poll()`` under the pull's deadline, the source's channel thread progresses its agent.
Host (DRAM) and CUDA (VRAM) pools go through the same code.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket as pysocket
import time
import uuid

os.environ.setdefault("UCX_MODULES", "^efa")      # a bundled UCX module crashes at exit next to
                                                   # Debian's libibverbs
import numpy as np                                 # noqa: E402
import torch                                       # noqa: E402

from .base import TransferError                                      # noqa: E402
from .channel import channel_backend                                 # noqa: E402
from .messages import NixlInfo                                       # noqa: E402
from .planes import RELEASE_WAIT_S, SinkPlane, SourcePlane           # noqa: E402

try:
    from nixl_cu12 import nixl_agent, nixl_agent_config             # noqa: E402
except ImportError:                                                  # pragma: no cover
    from nixl._api import nixl_agent, nixl_agent_config              # noqa: E402

log = logging.getLogger(__name__)
logging.getLogger("nixl").setLevel(logging.WARNING)
BACKEND = "NIXL"
_ids = itertools.count(1)


def _agent(role: str) -> "nixl_agent":
    name = f"kv-{role}-{pysocket.gethostname()}-{os.getpid()}-{next(_ids)}-{uuid.uuid4().hex[:8]}"
    try:
        return nixl_agent(name, nixl_agent_config(enable_prog_thread=False,
                                                  enable_listen_thread=False, backends=["UCX"]))
    except Exception as exc:
        raise TransferError(f"cannot create a NIXL agent with the UCX backend: {exc}") from exc


def _mem(t: torch.Tensor) -> tuple:
    """(NIXL memory type, device id) of a tensor."""
    return ("VRAM", t.device.index or 0) if t.device.type == "cuda" else ("DRAM", 0)


class NixlSourcePlane(SourcePlane):
    def __init__(self, pool: torch.Tensor) -> None:
        self.agent = _agent("ctx")
        self.pool = pool
        self.reg = self.agent.register_memory(pool)
        mem, dev = _mem(pool)
        self.info = NixlInfo(metadata=bytes(self.agent.get_agent_metadata()),
                             addr=pool.data_ptr(), nbytes=pool.numel(), mem=mem, dev=dev)

    def hello(self, peer: bytes, info: object) -> NixlInfo:
        return self.info

    def progress(self) -> None:
        self.agent.get_new_notifs()           # drives UCX: connection setup, remote reads

    def close(self) -> None:
        self.agent.deregister_memory(self.reg)


class _Read:
    def __init__(self, handle, status: str) -> None:
        self.handle, self.status = handle, status


class NixlSinkPlane(SinkPlane):
    info_type = NixlInfo

    def __init__(self, pool: torch.Tensor) -> None:
        self.agent = _agent("gen")
        self.pool = pool
        self.device = pool.device.type
        self.regs = {id(pool): self.agent.register_memory(pool)}

    def connect(self, endpoint: str, info: NixlInfo) -> dict:
        try:
            name = self.agent.add_remote_agent(info.metadata)
            return {"name": name, "addr": info.addr, "mem": info.mem, "dev": info.dev,
                    "endpoint": endpoint}
        except Exception as exc:
            raise TransferError(f"cannot load the NIXL metadata of the context worker at "
                                f"{endpoint}: {exc}") from exc

    def forget(self, conn: dict) -> None:
        self.agent.remove_remote_agent(conn["name"])

    def staging(self, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.pool.device)
        self.regs[id(buf)] = self.agent.register_memory(buf)
        return buf

    def unstage(self, buf: torch.Tensor) -> None:
        reg = self.regs.pop(id(buf), None)
        if reg is not None:
            self.agent.deregister_memory(reg)

    def post(self, conn: dict, frames: list, dst: torch.Tensor) -> _Read:
        mem, dev = _mem(dst)
        base = dst.data_ptr()
        local = np.array([(base + d, n, dev) for _, d, n, _ in frames], dtype=np.uint64)
        remote = np.array([(conn["addr"] + s, n, conn["dev"]) for s, _, n, _ in frames],
                          dtype=np.uint64)
        try:
            handle = self.agent.initialize_xfer(
                "READ", self.agent.get_xfer_descs(local, mem),
                self.agent.get_xfer_descs(remote, conn["mem"]), conn["name"])
            status = self.agent.transfer(handle)
        except Exception as exc:
            raise TransferError(f"NIXL READ from the context worker at {conn['endpoint']} "
                                f"failed to start: {exc}") from exc
        op = _Read(handle, status)
        if status == "ERR":
            self.cancel(op)
            raise TransferError(f"NIXL READ from the context worker at {conn['endpoint']} "
                                "failed to start")
        return op

    def test(self, op: _Read) -> bool:
        if op.status == "PROC":
            try:
                op.status = self.agent.check_xfer_state(op.handle)
            except Exception as exc:
                op.status = "ERR"
                raise TransferError(f"NIXL READ failed: {type(exc).__name__}: {exc} (the "
                                    "context worker died or dropped the connection)") from exc
        if op.status == "ERR":
            raise TransferError("NIXL READ failed (the context worker died or dropped the "
                                "connection)")
        if op.status == "DONE":
            self._release(op)
            return True
        return False

    def cancel(self, op: _Read) -> None:
        if op.handle is None:
            return
        try:
            self._release(op)             # cancels a READ in progress
            return
        except Exception:
            pass
        deadline = time.monotonic() + RELEASE_WAIT_S    # not cancellable: let it finish
        while time.monotonic() < deadline:
            try:
                if self.agent.check_xfer_state(op.handle) != "PROC":
                    break
            except Exception:
                break
        try:
            self._release(op)
        except Exception as exc:
            log.error("NIXL: could not release a READ: %s", exc)

    def _release(self, op: _Read) -> None:
        if op.handle is not None:
            self.agent.release_xfer_handle(op.handle)
            op.handle = None

    def close(self) -> None:
        for reg in self.regs.values():
            self.agent.deregister_memory(reg)
        self.regs.clear()


make_source, make_sink = channel_backend(BACKEND, NixlSourcePlane, NixlSinkPlane,
                                         devices=("cpu", "cuda"))
