"""The MPI transfer backend: mpi4py over MPICH, between independently started workers.

How to start workers: each worker runs under its own ``mpiexec.gforker -n 1`` (MPICH's, installed
by the ``mpich`` wheel next to ``python``), e.g. ``mpiexec.gforker -n 1 worker start --role context ...``
(Hydra's ``mpiexec`` works too, but it listens on 0.0.0.0 for its PMI proxies). MPICH runs over
UCX here, so the worker's ``--host`` confines it like the UCX backend (``sockets.confine_ucx``).
Two processes started without ``mpiexec`` ("singletons") cannot join each other; a pair where
at most one side is a singleton can (the tests start the context side under ``mpiexec`` and keep
the generation side in the test process). No shared ``mpiexec``, hostfile or name server is
needed: the context worker opens an MPI port (``Open_port``) and hands its name to each sink on
the control channel's Hello (``channel.py``); the sink ``Connect``s in a helper thread (with
MPICH's connect timeout) and identifies itself with a token; the context side ``Accept``s in an
acceptor thread, one accept per hello (``Accept`` has no timeout: an accept whose sink died
waits for the next sink and is never waited on). Per round the sink posts ``Irecv``s straight
into its blocks and asks for the round; the source's channel thread posts the ``Isend``s from the
pool. The process does not call ``MPI_Finalize`` at exit (a pending ``Accept`` would hang it).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid

import mpi4py

if not hasattr(mpi4py, "MPI"):               # only before MPI is initialised
    mpi4py.rc.finalize = False
    mpi4py.rc.thread_level = "multiple"
from mpi4py import MPI                                                # noqa: E402
import torch                                                          # noqa: E402

from .base import TransferError                                      # noqa: E402
from .channel import channel_backend                                 # noqa: E402
from .messages import MpiInfo                                        # noqa: E402
from .planes import RELEASE_WAIT_S, SinkPlane, SourcePlane           # noqa: E402

log = logging.getLogger(__name__)
BACKEND = "MPI"
TOKEN_TAG = 1
CONNECT_TIMEOUT_S = 10
SPIN_S = 0.005                 # sink: progress budget per poll()
_TAGS = None


def _tag(tag: int) -> int:
    global _TAGS
    if _TAGS is None:
        _TAGS = int(MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)) - 1
    return 2 + tag % _TAGS


def _check_threads() -> None:
    if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
        raise TransferError("the MPI transfer backend needs MPI_THREAD_MULTIPLE; import "
                            "transfer.mpi_backend before anything initialises MPI")


def _testall(reqs: list) -> bool:
    try:
        return MPI.Request.Testall(reqs)
    except MPI.Exception as exc:
        raise TransferError(f"MPI transfer failed: {exc.Get_error_string()}") from exc


def _settle(reqs: list, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if MPI.Request.Testall(reqs):
                return True
        except MPI.Exception:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)


def _cancel(reqs: list) -> bool:
    for req in reqs:
        try:
            if not req.Test():
                req.Cancel()
        except MPI.Exception:
            pass
    return _settle(reqs, RELEASE_WAIT_S)


class MpiSourcePlane(SourcePlane):
    push = True
    spin = False

    def __init__(self, pool: torch.Tensor) -> None:
        _check_threads()
        self.flat = pool.reshape(-1).numpy()
        self.port = MPI.Open_port()
        self.tokens: dict = {}         # sink identity -> token
        self.comms: dict = {}          # token -> intercommunicator
        self.sends: dict = {}          # tid -> [request]
        self.lock = threading.Condition()
        self.wanted = threading.Semaphore(0)
        self.closing = False
        threading.Thread(target=self._accept, name="kv-mpi-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            self.wanted.acquire()
            if self.closing:
                return
            try:
                comm = MPI.COMM_SELF.Accept(self.port)
                comm.Set_errhandler(MPI.ERRORS_RETURN)
                buf, status = bytearray(64), MPI.Status()
                req = comm.Irecv([buf, MPI.BYTE], source=0, tag=TOKEN_TAG)
                deadline = time.monotonic() + CONNECT_TIMEOUT_S
                while not req.Test(status):
                    if time.monotonic() > deadline:
                        _cancel([req])
                        break
                    time.sleep(0.0005)
                else:
                    token = bytes(buf[:status.Get_count(MPI.BYTE)]).decode()
                if time.monotonic() > deadline:
                    log.warning("MPI: a generation worker connected but sent no token")
                    continue
            except Exception:
                if self.closing:
                    return
                log.exception("MPI: accepting a generation worker failed")
                continue
            with self.lock:
                self.comms[token] = comm
                self.lock.notify_all()

    def hello(self, peer: bytes, info: object) -> MpiInfo:
        token = uuid.uuid4().hex
        self.tokens[peer] = token
        self.wanted.release()
        return MpiInfo(self.port, token)

    def serve(self, peer: bytes, tid: str, frames: list) -> None:
        token = self.tokens.get(peer)
        with self.lock:
            self.lock.wait_for(lambda: token in self.comms, timeout=CONNECT_TIMEOUT_S)
            comm = self.comms.get(token)
        if comm is None:
            raise TransferError("the generation worker has not connected to this context "
                                "worker's MPI port")
        reqs = self.sends.setdefault(tid, [])
        for off, n, tag in frames:
            reqs.append(comm.Isend([self.flat[off:off + n], MPI.BYTE], dest=0, tag=_tag(tag)))

    def busy(self) -> bool:
        return bool(self.sends)

    def progress(self) -> None:
        for tid, reqs in list(self.sends.items()):
            try:
                done = MPI.Request.Testall(reqs)
            except MPI.Exception as exc:
                log.info("MPI: sends of transfer %r failed: %s", tid, exc.Get_error_string())
                done = True
            if done:
                del self.sends[tid]

    def drop(self, tid: str) -> None:
        reqs = self.sends.pop(tid, [])
        if reqs and not _settle(reqs, RELEASE_WAIT_S) and not _cancel(reqs):
            log.warning("MPI: sends of transfer %r could not be cancelled (their receiver "
                        "stopped reading)", tid)

    def close(self) -> None:
        self.closing = True
        self.wanted.release()
        for reqs in self.sends.values():
            _cancel(reqs)
        self.sends.clear()


class _Conn:
    def __init__(self) -> None:
        self.comm = None
        self.error = None


class MpiSinkPlane(SinkPlane):
    push = True
    frame_bytes = 1 << 30          # one tagged message per frame (< 2 GiB: MPI counts are ints)
    info_type = MpiInfo

    def __init__(self, pool: torch.Tensor) -> None:
        _check_threads()

    def connect(self, endpoint: str, info: MpiInfo) -> _Conn:
        conn = _Conn()
        port, token = info.port, info.token.encode()

        def run() -> None:
            try:
                opts = MPI.Info.Create()
                opts.Set("timeout", str(CONNECT_TIMEOUT_S))
                comm = MPI.COMM_SELF.Connect(port, opts)
                opts.Free()
                comm.Set_errhandler(MPI.ERRORS_RETURN)
                comm.Send([token, MPI.BYTE], dest=0, tag=TOKEN_TAG)
                conn.comm = comm
            except Exception as exc:
                detail = exc.Get_error_string() if isinstance(exc, MPI.Exception) else exc
                conn.error = TransferError(
                    f"cannot connect to the MPI port of the context worker at {endpoint}: "
                    f"{detail}; every MPI worker must run under its own `mpiexec.gforker -n 1`")

        threading.Thread(target=run, name="kv-mpi-connect", daemon=True).start()
        return conn

    def connected(self, conn: _Conn) -> bool:
        if conn.error is not None:
            raise conn.error
        return conn.comm is not None

    def forget(self, conn: _Conn) -> None:
        conn.comm = None               # no Disconnect: it would wait for a dead peer

    def post(self, conn: _Conn, frames: list, dst: torch.Tensor) -> list:
        out = dst.numpy()
        return [conn.comm.Irecv([out[d:d + n], MPI.BYTE], source=0, tag=_tag(tag))
                for _, d, n, tag in frames]

    def test(self, op: list) -> bool:
        # MPI moves a large message in many steps, each driven by a progress call: keep
        # calling for a few ms rather than once per worker-loop iteration
        budget = time.monotonic() + SPIN_S
        while not _testall(op):
            if time.monotonic() > budget:
                return False
        return True

    def cancel(self, op: list) -> None:
        if not _cancel(op):
            log.error("MPI: receives still in flight after cancelling them")


make_source, make_sink = channel_backend(BACKEND, MpiSourcePlane, MpiSinkPlane)
