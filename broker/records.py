"""The broker's records: a worker as the broker knows it, a request and its lifecycle state, and
an outgoing message with the socket it goes to. Plain data, no behaviour: ``broker/state.py`` owns
every decision about them (docs/architecture.md §2). No I/O, no clock.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Optional

from broker import protocol as p

FRONT, BACK = "front", "back"     # which socket an outgoing message goes to

# request states (docs/architecture.md §2)
QUEUED, PREFILLING, KV_READY, DECODING, STREAMING = "QUEUED", "PREFILLING", "KV_READY", "DECODING", "STREAMING"
GENERATING = "GENERATING"          # the whole request on a `both` worker, or a continuation
RESUMING = "RESUMING"              # waiting for a worker to continue it after its tokens so far


@dataclass
class Out:
    socket: str          # FRONT or BACK
    identity: bytes
    msg: p.Message


@dataclass
class Worker:
    identity: bytes
    worker_id: str
    role: str
    model: str
    slots: int
    kv_blocks: int
    transfer: dict
    pid: int
    heartbeat_s: float
    last_seen: float
    free_blocks: int = 0
    leases_reported: int = 0
    max_decode_batch: int = 0
    chat_markers: tuple = ()                      # Ready.chat_markers
    inflight: set = field(default_factory=set)    # request ids whose current phase runs here
    leases: set = field(default_factory=set)      # request ids whose KV this worker holds
    draining: bool = False     # leaving (SIGTERM, `worker drain`): finishes its work, takes no more
    block_size: int = 0                           # tokens per KV block (Ready), 0: unknown
    kv_keys: set = field(default_factory=set)     # the cached-block keys it published (KV events)

    @classmethod
    def from_ready(cls, identity: bytes, msg, now: float) -> "Worker":
        """The record of a worker that registered with ``msg`` (a ``Ready``) at ``now``."""
        return cls(identity, msg.worker_id, msg.role, msg.model, msg.slots, msg.kv_blocks, dict(msg.transfer),
                   msg.pid, msg.heartbeat_ms / 1000, now, free_blocks=msg.kv_blocks,
                   chat_markers=tuple(msg.chat_markers), block_size=msg.tokens_per_block)

    @property
    def credits(self) -> int:
        """Free slots; none while draining, so worker selection never picks it (broker/pool.py)."""
        return 0 if self.draining else self.slots - len(self.inflight)

    def does(self, phase: str) -> bool:
        return self.role == phase or self.role == "both"

    def summary(self) -> dict:
        """What the broker's stats (a Pong) show of this worker."""
        return {"worker_id": self.worker_id, "role": self.role, "model": self.model, "pid": self.pid,
                "slots": self.slots, "inflight": len(self.inflight), "leases": len(self.leases),
                "kv_blocks": self.kv_blocks, "free_blocks": self.free_blocks,
                "leases_reported": self.leases_reported, "max_decode_batch": self.max_decode_batch,
                "chat_markers": list(self.chat_markers), "draining": self.draining,
                "kv_keys": len(self.kv_keys)}


@dataclass
class Request:
    request_id: str
    client: bytes
    submit: p.Submit
    sampling: dict
    received: float
    deadline: float
    state: str = QUEUED
    attempt: int = 0                  # bumped on every dispatch; stale worker messages are dropped
    prefill_attempts: int = 0
    mode: str = ""                    # "disagg" or "agg", fixed at first dispatch
    worker: Optional[bytes] = None    # the worker running the current phase
    ctx_worker: Optional[bytes] = None  # the context worker holding the KV lease
    lease_attempt: int = 0
    lease_deadline: Optional[float] = None
    context: Optional[p.ContextDone] = None
    next_index: int = 0               # tokens already sent to the client
    # those tokens (a continuation starts after them), 4 bytes each
    output_ids: array = field(default_factory=lambda: array("I"))
    output_chars: int = 0             # the length of the text sent with them
    migrations: int = 0               # times its generation moved to another worker
    prompt_tokens: int = 0
    cached_tokens: int = 0            # of the prompt's, served from the worker's prefix cache
    t_dispatch: Optional[float] = None
    t_first: Optional[float] = None
    prefill_s: float = 0.0
    kv_transfer_s: float = 0.0
    kv_bytes: int = 0                 # the KV cache the generation worker pulled
    decode_tries: int = 0
    note: str = ""                    # why the request was re-run, for its final error
    client_rid: str = ""              # the id its client gave (request_id is the broker's key)
    model: str = ""                   # the model it runs on: every phase goes to workers of it
    keys: Optional[dict] = None       # its prefix keys for routing, by block size (broker/kv_index.py)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.next_index,
                "cached_tokens": self.cached_tokens}

    def timings(self, now: float) -> dict:
        """Seconds: queue, prefill, kv_transfer, ttft (None before the first token) and total;
        and kv_bytes, the size of the KV cache moved (0 for a request served by one worker)."""
        return {
            "queue": (self.t_dispatch - self.received) if self.t_dispatch is not None else now - self.received,
            "prefill": self.prefill_s,
            "kv_transfer": self.kv_transfer_s,
            "ttft": (self.t_first - self.received) if self.t_first is not None else None,
            "total": now - self.received,
            "kv_bytes": self.kv_bytes,
        }
