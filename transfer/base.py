"""The KV transfer interface: errors, the KV layout, the source/sink contracts, the KV handle.

A context worker serves the KV blocks of a request through a ``KvSource``; the generation worker
pulls them into its own pool through a ``KvSink``. Both are driven by the worker's single-threaded
loop through ``poll()``; a backend may run its own threads and sockets behind them.

The KV handle that travels through the broker is a plain msgpack-able dict, never a pickle.
This module does no I/O.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch

from .plan import token_runs

log = logging.getLogger("transfer")

MAX_ID_CHARS = 1024      # a transfer id: it travels on the control channel (messages.py)


class TransferError(Exception):
    """A KV transfer that failed; ``code`` is the protocol error code the worker reports."""

    code = "KV_TRANSFER_FAILED"


class TransferTimeout(TransferError):
    """``kv_transfer_timeout_ms`` passed before the transfer finished."""

    code = "KV_TRANSFER_TIMEOUT"


class BackendUnavailable(TransferError):
    """The configured backend cannot be used here; the message says how to get it."""


# ---------------------------------------------------------------------------------------------
# the KV layout: what both sides must agree on (block size may differ)

_DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8,
                "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1}


@dataclass(frozen=True)
class KvLayout:
    """One worker's KV pool: ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str          # a torch dtype name without the "torch." prefix, e.g. "float32"
    block_size: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TransferError(f"invalid KV layout {name}={value!r}: expected an integer >= 1")
        if self.dtype not in _DTYPE_SIZES:
            raise TransferError(f"invalid KV layout dtype={self.dtype!r}: expected one of "
                                f"{', '.join(_DTYPE_SIZES)}")

    @property
    def itemsize(self) -> int:
        return _DTYPE_SIZES[self.dtype]

    @property
    def row_nbytes(self) -> int:
        """Bytes of one token in one layer for K (or V): ``num_kv_heads * head_dim`` elements."""
        return self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def token_nbytes(self) -> int:
        return self.num_layers * 2 * self.row_nbytes

    @property
    def block_nbytes(self) -> int:
        return self.token_nbytes * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "KvLayout":
        if not isinstance(d, dict):
            raise TransferError(f"malformed KV layout {d!r}: expected a map")
        names = ("num_layers", "num_kv_heads", "head_dim", "dtype", "block_size")
        missing = [n for n in names if n not in d]
        if missing:
            raise TransferError(f"malformed KV layout {d!r}: missing {', '.join(missing)}")
        return cls(**{n: d[n] for n in names})

    @classmethod
    def from_pool(cls, pool: torch.Tensor) -> "KvLayout":
        if pool.dim() != 6 or pool.shape[2] != 2:
            raise TransferError(f"KV pool of shape {tuple(pool.shape)} is not "
                                "[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]")
        _, layers, _, block_size, heads, head_dim = pool.shape
        return cls(layers, heads, head_dim, str(pool.dtype).removeprefix("torch."), block_size)

    def check_compatible(self, remote: "KvLayout", remote_worker: str = "",
                         local_worker: str = "") -> None:
        """``self`` is this (generation) worker's layout, ``remote`` the context worker's; the
        two workers' names (when known) go into the error. Bytes of another dtype would read
        as garbage, so a mismatch is an error, never a conversion."""
        def named(worker: str) -> str:
            return f" ({worker})" if worker else ""

        for name, what in (("dtype", "KV dtype (kv_cache_config.dtype)"),
                           ("num_kv_heads", "number of KV heads"), ("head_dim", "head size"),
                           ("num_layers", "number of layers")):
            theirs, ours = getattr(remote, name), getattr(self, name)
            if theirs != ours:
                raise TransferError(f"{what} mismatch: context worker {theirs}{named(remote_worker)}, "
                                    f"generation worker {ours}{named(local_worker)}")


def pool_bytes(pool: torch.Tensor, layout: KvLayout, backend: str,
               devices: tuple = ("cpu",)) -> torch.Tensor:
    """The pool as a writable uint8 tensor ``[num_blocks, block_nbytes]`` sharing its memory, on
    any of ``devices`` ("cpu", "cuda") that the backend can move."""
    if not isinstance(pool, torch.Tensor):
        raise TransferError(f"KV pool must be a torch.Tensor, got {type(pool).__name__}")
    if pool.device.type not in devices:
        if devices == ("cpu",):
            raise TransferError(f"KV pool is on device {pool.device}: GPU memory is not supported "
                                f"by the {backend} transfer backend; keep the KV pool in host "
                                "(CPU) memory or use NIXL or UCX")
        raise TransferError(f"KV pool is on device {pool.device}: the {backend} transfer backend "
                            f"supports {' and '.join(devices)} memory")
    if not pool.is_contiguous():
        raise TransferError("KV pool must be one contiguous tensor")
    actual = KvLayout.from_pool(pool)
    if actual != layout:
        raise TransferError(f"KV pool of shape {tuple(pool.shape)} and dtype {pool.dtype} does "
                            f"not match the declared layout {layout}")
    return pool.view(torch.uint8).reshape(pool.shape[0], layout.block_nbytes)


def token_view(blocks: torch.Tensor, layout: KvLayout) -> torch.Tensor:
    """uint8 blocks ``[n, block_nbytes]`` seen as ``[n, num_layers, 2, block_size, row_nbytes]``."""
    return blocks.view(-1, layout.num_layers, 2, layout.block_size, layout.row_nbytes)


def copy_tokens(dst: torch.Tensor, dst_ids: list, src: torch.Tensor, src_ids: Callable,
                t0: int, t1: int, src_block_size: int, dst_block_size: int) -> None:
    """Copy tokens ``[t0, t1)`` of a transfer between two token views of different block sizes.
    ``src_ids(i)`` and ``dst_ids[i]`` give the block holding the transfer's i-th block."""
    for run in token_runs(t0, t1, src_block_size, dst_block_size):
        dst[dst_ids[run.dst_block], :, :, run.dst_off:run.dst_off + run.n] = \
            src[src_ids(run.src_block), :, :, run.src_off:run.src_off + run.n]


# ---------------------------------------------------------------------------------------------
# the KV handle: {backend, endpoint, transfer_id, block_ids, num_tokens, layout, worker_id}

class KvHandle(NamedTuple):
    backend: str
    endpoint: str
    transfer_id: str
    block_ids: list
    num_tokens: int
    layout: KvLayout
    worker_id: str = ""     # the context worker holding the KV; optional, named in errors
    curve_key: str = ""     # the source's CURVE public key (Z85) when its channel runs CURVE


def make_handle(backend: str, endpoint: str, transfer_id: str, block_ids: list,
                num_tokens: int, layout: KvLayout, worker_id: str = "", curve_key: str = "") -> dict:
    handle = {"backend": backend, "endpoint": endpoint, "transfer_id": transfer_id,
              "block_ids": [int(b) for b in block_ids], "num_tokens": int(num_tokens),
              "layout": layout.to_dict()}
    if worker_id:
        handle["worker_id"] = worker_id
    if curve_key:
        handle["curve_key"] = curve_key
    return handle


def check_block_ids(block_ids: Any, num_tokens: Any, layout: KvLayout, num_blocks: int,
                    what: str) -> list:
    """Validate a block list holding ``num_tokens`` tokens in ``layout``; returns the blocks that
    hold them, as ints (blocks past the last token, reserved for tokens to come, are dropped)."""
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise TransferError(f"invalid num_tokens={num_tokens!r}: expected an integer >= 1")
    if not isinstance(block_ids, (list, tuple)) or not all(
            isinstance(b, int) and not isinstance(b, bool) for b in block_ids):
        raise TransferError(f"invalid {what} {block_ids!r}: expected a list of integers")
    need = layout.blocks_for(num_tokens)
    if len(block_ids) < need:
        raise TransferError(f"{what} has {len(block_ids)} blocks but {num_tokens} tokens need "
                            f"{need} blocks of {layout.block_size} tokens")
    block_ids = block_ids[:need]
    bad = [b for b in block_ids if not 0 <= b < num_blocks]
    if bad:
        raise TransferError(f"{what} {bad[:8]} out of range: the pool has {num_blocks} blocks")
    if len(set(block_ids)) != len(block_ids):
        raise TransferError(f"{what} lists a block twice: {list(block_ids)[:32]}")
    return [int(b) for b in block_ids]


def parse_handle(handle: Any, backend: str) -> KvHandle:
    """Check a KV handle's shape; raises TransferError naming what is wrong."""
    if not isinstance(handle, dict):
        raise TransferError(f"malformed KV handle {handle!r}: expected a map")
    missing = [k for k in KvHandle._fields if k not in handle and k not in KvHandle._field_defaults]
    if missing:
        raise TransferError(f"malformed KV handle: missing {', '.join(missing)}")
    if handle["backend"] != backend:
        raise TransferError(f"KV handle is for the {handle['backend']!r} transfer backend but "
                            f"this generation worker uses {backend!r}")
    for key in ("endpoint", "transfer_id"):
        if not isinstance(handle[key], str) or not handle[key]:
            raise TransferError(f"malformed KV handle: {key}={handle[key]!r}")
    worker_id = handle.get("worker_id", "")
    if not isinstance(worker_id, str) or len(worker_id) > MAX_ID_CHARS:
        raise TransferError(f"malformed KV handle: worker_id={worker_id!r:.80}")
    curve_key = handle.get("curve_key", "")
    if not isinstance(curve_key, str) or len(curve_key) not in (0, 40):
        raise TransferError(f"malformed KV handle: curve_key={curve_key!r:.80} (expected 40 Z85 characters)")
    layout = KvLayout.from_dict(handle["layout"])
    block_ids = check_block_ids(handle["block_ids"], handle["num_tokens"], layout,
                                2**62, "KV handle block_ids")
    return KvHandle(backend, handle["endpoint"], handle["transfer_id"], block_ids,
                    handle["num_tokens"], layout, worker_id, curve_key)


def check_pull(pull_id: str, handle: Any, dest_block_ids: Any, backend: str, layout: KvLayout,
               num_blocks: int, running: dict,
               check_handle: Optional[Callable[[dict, KvHandle], None]] = None,
               worker_id: str = "") -> tuple:
    """What every sink checks before a pull starts, in this order: the handle (then the
    backend's own ``check_handle``), the two layouts, the destination blocks, a duplicate pull
    id. ``worker_id``: the sink's own worker, for the errors. Returns ``(KvHandle, destination
    block ids holding its tokens)``; raises TransferError."""
    h = parse_handle(handle, backend)
    if check_handle is not None:
        check_handle(handle, h)
    layout.check_compatible(h.layout, h.worker_id or f"at {h.endpoint}", worker_id)
    dst = check_block_ids(dest_block_ids, h.num_tokens, layout, num_blocks, "dest_block_ids")
    if pull_id in running:
        raise TransferError(f"pull {pull_id!r} is already running")
    return h, dst


# ---------------------------------------------------------------------------------------------
# results and the two contracts

@dataclass(frozen=True)
class SourceEvent:
    kind: str            # "pulled" | "expired"
    transfer_id: str


@dataclass
class Registration:
    """KV blocks a source serves for one transfer; backends subclass it for their own state."""
    block_ids: list
    num_tokens: int
    started: Optional[float] = None   # the first pull request: the transfer's clock starts
    pulled: bool = False


class Registrations(dict):
    """A source's table of registered transfers (transfer id -> Registration).

    What every backend shares: validating a registration, refusing a duplicate, and sweeping out
    transfers that were pulled or expired. ``lock`` guards the table for the serving thread too.
    """

    def __init__(self, layout: KvLayout, num_blocks: int, timeout_s: float,
                 factory: Callable[..., Registration] = Registration) -> None:
        super().__init__()
        self.lock = threading.RLock()     # reentrant: len() takes it too
        self._layout, self._num_blocks, self._timeout_s = layout, num_blocks, timeout_s
        self._factory = factory

    def add(self, transfer_id: str, block_ids: list, num_tokens: int) -> Registration:
        if not isinstance(transfer_id, str) or not 0 < len(transfer_id) <= MAX_ID_CHARS:
            raise TransferError(f"invalid transfer_id {transfer_id!r:.80}: expected a string of "
                                f"1-{MAX_ID_CHARS} characters")
        ids = check_block_ids(block_ids, num_tokens, self._layout, self._num_blocks, "block_ids")
        with self.lock:
            if transfer_id in self:
                raise TransferError(f"transfer {transfer_id!r} is already registered")
            reg = self[transfer_id] = self._factory(ids, num_tokens)
        return reg

    def expired(self, reg: Registration, now: float) -> bool:
        return reg.started is not None and now - reg.started > self._timeout_s

    def sweep(self) -> list:
        """Remove the pulled and the expired transfers: ``[(SourceEvent, Registration)]``."""
        now, done = time.monotonic(), []
        with self.lock:
            for tid, reg in list(self.items()):
                if reg.pulled:
                    done.append((SourceEvent("pulled", tid), self.pop(tid)))
                elif self.expired(reg, now):
                    done.append((SourceEvent("expired", tid), self.pop(tid)))
        for event, _ in done:
            if event.kind == "expired":
                log.warning("KV transfer %r expired: not pulled within kv_transfer_timeout_ms=%d "
                            "of its start", event.transfer_id, round(self._timeout_s * 1000))
        return done

    def __len__(self) -> int:
        with self.lock:
            return dict.__len__(self)


@dataclass(frozen=True)
class PullResult:
    pull_id: str
    ok: bool
    error: Optional[TransferError]
    nbytes: int
    seconds: float


class KvSource(ABC):
    """Context side: serves registered blocks of the local KV pool to pulling sinks."""

    endpoint: str           # where sinks reach it: the advertised address, put in handles
    bound: str = ""         # where it listens, where that is an address ('' : the endpoint)
    worker_id: str = ""     # the worker it serves (``registry.create_source``): put in handles

    @abstractmethod
    def register(self, transfer_id: str, block_ids: list, num_tokens: int) -> dict:
        """Serve these blocks under ``transfer_id``; returns the KV handle (a plain dict)."""

    @abstractmethod
    def release(self, transfer_id: str) -> None:
        """Stop serving; idempotent. Once it returns, nothing here reads those blocks."""

    @abstractmethod
    def poll(self) -> list:
        """``SourceEvent``s since the last poll: "pulled" (done) and "expired" (timed out).

        Either way the registration is gone and the caller may free the blocks."""

    @property
    @abstractmethod
    def num_registered(self) -> int: ...

    @property
    def alive(self) -> bool:
        """False once a thread this source needs has died: the worker must leave service."""
        return True

    @abstractmethod
    def close(self) -> None: ...


class KvSink(ABC):
    """Generation side: pulls a context worker's blocks into the local KV pool."""

    worker_id: str = ""     # the worker it serves (``registry.create_sink``): named in errors

    @abstractmethod
    def start_pull(self, pull_id: str, handle: dict, dest_block_ids: list) -> None:
        """Non-blocking; raises TransferError at once for a bad handle or layout."""

    @abstractmethod
    def poll(self) -> list:
        """``PullResult``s of the pulls that finished (ok or not) since the last poll."""

    @abstractmethod
    def cancel(self, pull_id: str) -> None:
        """Once it returns, the pull's destination blocks are not written any more."""

    @property
    @abstractmethod
    def num_active(self) -> int:
        """Pulls started and neither finished nor cancelled."""

    @abstractmethod
    def close(self) -> None: ...
