"""The SHM transfer backend: same-host KV handoff through the context worker's pool in shared
memory; the generation worker copies blocks straight out of it (one memcpy, no staging copy
when the block sizes match).

When the source is created, the context worker's pool is moved into shared memory in place
(``torch``'s ``share_memory_()``: an unlinked ``/dev/shm`` file held open by descriptor, so a
killed worker leaks nothing; every view of the pool follows the move). A sink maps that file
read-only through ``/proc/PID/fd/FD`` once per peer. KV handles carry a host id (machine id and
boot id): a sink on another host refuses them with a clear error. Start, end and expiry travel on
the control channel of ``channel.py``; Done is accepted only while the source still holds the
transfer, so blocks read after an expiry or a release are never used.

The sink moves its own pool into shared memory the same way, only to page-align it: glibc's
large, non-temporal memcpy stalls on 4K aliasing when the destination sits a few cache lines past
the source modulo a page (a torch pool starts at page offset 0x40, a shared one at 0: 256 MiB
copied at ~3 GB/s instead of ~10 on a 2-core EPYC). With both pools page-aligned, a run is one
memcpy; a run that still aliases (a staged or odd-sized layout) is copied in pieces that stay on
glibc's cached path (see ``copy_run``).
"""
from __future__ import annotations

import logging
import mmap
import os

import numpy as np
import torch

from .base import KvHandle, TransferError
from .channel import channel_backend
from .messages import ShmInfo
from .planes import SinkPlane, SourcePlane

BACKEND = "SHM"
PAGE = mmap.PAGESIZE
# (dst - src) % PAGE in [1, ALIAS_BAND): glibc's non-temporal loop stalls on 4K aliasing there
# (200 MiB copies: 3-4 GB/s at 16..256 bytes, 5-8 at 512, 8-12 at 0 and from 1024 on)
ALIAS_BAND = 512
# a piece stays under glibc's non-temporal threshold (3/4 of a thread's share of the last-level
# cache; 192 MiB here), so it is copied through the cache: 6.0 GB/s in 1 MiB pieces where one
# aliased memcpy made 3.1 (pieces of 128 KiB .. 8 MiB measured 5.8-6.1)
PIECE = 1 << 20

log = logging.getLogger(__name__)


def host_id() -> str:
    """This host's identity for the current boot: /etc/machine-id and the kernel's boot id."""
    parts = []
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(path) as f:
                parts.append(f.read().strip())
        except OSError:
            parts.append("")
    return "-".join(parts) if any(parts) else f"hostname:{os.uname().nodename}"


class ShmSourcePlane(SourcePlane):
    tick = False                  # the sink copies; nothing here moves

    def __init__(self, pool: torch.Tensor) -> None:
        storage = pool.untyped_storage()
        if torch.multiprocessing.get_sharing_strategy() != "file_descriptor":
            raise TransferError("the SHM transfer backend needs torch's 'file_descriptor' "
                                "sharing strategy (torch.multiprocessing.set_sharing_strategy)")
        if not storage.is_shared():
            storage.share_memory_()           # moves the pool into shared memory, in place
        fd, size = storage._share_fd_cpu_()[:2]
        self.info = ShmInfo(pid=os.getpid(), fd=int(fd), nbytes=int(size),
                            offset=pool.data_ptr() - storage.data_ptr(), host=host_id())

    def hello(self, peer: bytes, info: object) -> ShmInfo:
        return self.info

    def handle_extra(self) -> dict:
        return {"host": self.info.host}


class ShmSinkPlane(SinkPlane):
    info_type = ShmInfo

    def __init__(self, pool: torch.Tensor) -> None:
        self.host = host_id()
        _page_align(pool)

    def check_handle(self, handle: dict, h: KvHandle) -> None:
        if handle.get("host") != self.host:
            raise TransferError(_other_host(h.endpoint, handle.get("host"), self.host))

    def connect(self, endpoint: str, info: ShmInfo) -> dict:
        if info.host != self.host:
            raise TransferError(_other_host(endpoint, info.host, self.host))
        path = f"/proc/{info.pid}/fd/{info.fd}"
        try:
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), info.nbytes, prot=mmap.PROT_READ,
                                   flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        except (OSError, ValueError) as exc:
            raise TransferError(f"cannot map the KV pool of the context worker at {endpoint} "
                                f"({path}): {exc}; the SHM backend needs both workers on one "
                                "host, in one PID namespace, as the same user") from exc
        src = np.frombuffer(mapped, dtype=np.uint8)[info.offset:]
        return {"map": mapped, "src": src, "endpoint": endpoint}

    def forget(self, conn: dict) -> None:
        conn["src"] = None
        try:
            conn["map"].close()
        except BufferError:                 # a view is still alive; the GC unmaps it later
            pass

    def staging(self, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes + PAGE, dtype=torch.uint8)     # page-aligned: see copy_run
        pad = -buf.data_ptr() % PAGE
        return buf[pad:pad + nbytes]

    def post(self, conn: dict, frames: list, dst: torch.Tensor) -> bool:
        src, out = conn["src"], dst.numpy()
        for s, d, n, _ in frames:
            copy_run(out[d:d + n], src[s:s + n])
        return True

    def test(self, op: bool) -> bool:
        return True


def copy_run(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[:] = src`` (flat uint8, same length): one memcpy, or pieces of ``PIECE`` bytes where
    the destination is just past the source modulo a page (``ALIAS_BAND``), the one placement
    where glibc's copy of a large run is slower than copying it piecewise through the cache."""
    delta = (dst.ctypes.data - src.ctypes.data) % PAGE
    if len(src) <= PIECE or not 0 < delta < ALIAS_BAND:
        np.copyto(dst, src)
        return
    for i in range(0, len(src), PIECE):
        np.copyto(dst[i:i + PIECE], src[i:i + PIECE])


def _page_align(pool: torch.Tensor) -> None:
    """Moves a CPU pool into shared memory in place, as the source does (every view follows),
    so its blocks start at the same page offsets as the source's; a pool that cannot move stays
    where it is and is only copied into more slowly."""
    storage = pool.untyped_storage()
    if pool.device.type != "cpu" or storage.is_shared():
        return
    if torch.multiprocessing.get_sharing_strategy() != "file_descriptor":
        return                              # another strategy leaves named files behind on a kill
    try:
        storage.share_memory_()
    except RuntimeError as exc:             # e.g. /dev/shm too small for the pool
        log.warning("SHM sink: the KV pool stays at page offset %d (copies into it are slower): "
                    "%s", pool.data_ptr() % PAGE, exc)


def _other_host(endpoint: str, theirs: object, ours: str) -> str:
    return (f"the SHM transfer backend works only between workers on one host: the context "
            f"worker at {endpoint} runs on host {theirs!r}, this generation worker on "
            f"{ours!r}; use the NIXL, UCX, MPI or ZMQ backend across hosts")


make_source, make_sink = channel_backend(BACKEND, ShmSourcePlane, ShmSinkPlane)
