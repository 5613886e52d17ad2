"""The wire protocol between clients, the broker and workers. The protocol lives only here.

Frames after the ROUTER identity: ``[VERSION][command: 1 byte][msgpack map][*raw frames]``.
Every message is a frozen dataclass with ``encode()`` (to frames) and ``decode()`` (from frames).
Unknown keys in a body are ignored, so an optional field needs no version bump; a wrong version,
an unknown command, a missing field or a field of the wrong type raises ``ProtocolError``.

Nothing here is ever pickled: bodies are msgpack maps of plain values, bulk bytes ride as extra
frames. This module does no I/O.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import msgpack

VERSION = b"DSRV1"


class ProtocolError(ValueError):
    """A frame sequence that is not a valid message of this protocol version."""


# ---------------------------------------------------------------------------------------------
# error codes and finish reasons (shared vocabulary)

class Code:
    INVALID_REQUEST = "INVALID_REQUEST"      # bad input: names the field and the value
    OVERLOADED = "OVERLOADED"                # queue full: retry later
    NO_WORKERS = "NO_WORKERS"                # no worker of a needed role is registered
    WORKER_DIED = "WORKER_DIED"              # the worker holding the request stopped answering
    TIMEOUT = "TIMEOUT"                      # the request's deadline passed
    KV_TRANSFER_TIMEOUT = "KV_TRANSFER_TIMEOUT"
    KV_TRANSFER_FAILED = "KV_TRANSFER_FAILED"
    KV_LEASE_EXPIRED = "KV_LEASE_EXPIRED"
    DUPLICATE_REQUEST = "DUPLICATE_REQUEST"
    PROTOCOL = "PROTOCOL"
    INTERNAL = "INTERNAL"


class Finish:
    STOP = "stop"          # stop token or stop string
    LENGTH = "length"      # max_tokens or the model's context reached
    CANCELLED = "cancelled"


# ---------------------------------------------------------------------------------------------
# sampling parameters: validated at the client, at the broker and at the worker alike

@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0          # 0 means greedy
    top_k: int = 0                    # 0 means off
    top_p: float = 1.0
    seed: Optional[int] = None
    repetition_penalty: float = 1.0
    stop: tuple = ()                  # stop strings
    stop_token_ids: tuple = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, expected: str) -> ProtocolError:
            return ProtocolError(f"invalid sampling parameter {name}={value!r}: expected {expected}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return (is_int(v) or isinstance(v, float)) and math.isfinite(v)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "a number >= 0")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", self.top_k, "an integer >= 0 (0 turns it off)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "a number in (0, 1]")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", self.seed, "an integer in [0, 2**63) or null")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "a number > 0")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", self.stop, "a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(is_int(t) and t >= 0 for t in ids):
            raise bad("stop_token_ids", self.stop_token_ids, "a list of token ids >= 0")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", self.ignore_eos, "true or false")

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SamplingParams":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ProtocolError(f"invalid sampling parameters {d!r}: expected a map")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ProtocolError(f"unknown sampling parameter {unknown[0]!r}; known: {', '.join(sorted(names))}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d


# ---------------------------------------------------------------------------------------------
# message machinery

_REGISTRY: dict[int, type["Message"]] = {}


def _check_type(value: Any, tp: Any) -> bool:
    """A light structural check of a decoded value against a field annotation."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_check_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(tp)
        if args and args[0] is not Ellipsis:
            return all(_check_type(v, args[0]) for v in value)
        return True
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


class Message:
    CMD: ClassVar[int] = 0
    _hints: ClassVar[dict]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)

    def body(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "frames"}

    def encode(self) -> list:
        frames: list = [VERSION, bytes([self.CMD]), msgpack.packb(self.body(), use_bin_type=True)]
        frames.extend(getattr(self, "frames", ()) or ())
        return frames

    @classmethod
    def from_body(cls, body: dict, frames: Sequence = ()) -> "Message":
        hints = cls._hints
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name == "frames":
                continue
            if f.name in body:
                v = body[f.name]
                if not _check_type(v, hints[f.name]):
                    raise ProtocolError(f"{cls.__name__}.{f.name}: bad value {v!r}")
                kwargs[f.name] = v
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{cls.__name__}: missing field {f.name!r}")
        if "frames" in {f.name for f in dataclasses.fields(cls)}:
            kwargs["frames"] = tuple(frames)
        try:
            return cls(**kwargs)
        except ProtocolError:
            raise
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"{cls.__name__}: {e}") from e


def message(cmd: int):
    """Class decorator: a frozen dataclass registered under a one-byte command."""
    def wrap(cls):
        cls = dataclass(frozen=True)(cls)
        cls.CMD = cmd
        if cmd in _REGISTRY:
            raise RuntimeError(f"command {cmd} registered twice")
        _REGISTRY[cmd] = cls
        cls._hints = typing.get_type_hints(cls)
        return cls
    return wrap


def decode(frames: Sequence) -> Message:
    """Frames (without the ROUTER identity) to a message; raises ProtocolError."""
    if len(frames) < 3:
        raise ProtocolError(f"expected at least 3 frames, got {len(frames)}")
    raw = [bytes(f.buffer) if hasattr(f, "buffer") else f for f in frames[:3]]
    if raw[0] != VERSION:
        raise ProtocolError(f"wrong protocol version {raw[0][:16]!r}, expected {VERSION!r}")
    if len(raw[1]) != 1:
        raise ProtocolError(f"command frame must be 1 byte, got {len(raw[1])}")
    cls = _REGISTRY.get(raw[1][0])
    if cls is None:
        raise ProtocolError(f"unknown command {raw[1][0]}")
    try:
        body = msgpack.unpackb(raw[2], raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises a zoo of exception types
        raise ProtocolError(f"undecodable body for {cls.__name__}: {e}") from e
    if not isinstance(body, dict):
        raise ProtocolError(f"body of {cls.__name__} is not a map")
    return cls.from_body(body, frames[3:])


# ---------------------------------------------------------------------------------------------
# client <-> broker

@message(1)
class Submit(Message):
    request_id: str
    prompt: Optional[str] = None
    token_ids: Optional[list[int]] = None
    messages: Optional[list[dict]] = None
    sampling: dict = field(default_factory=dict)
    stream: bool = True
    timeout_ms: Optional[int] = None        # deadline, relative to the broker's receipt
    model: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.request_id or len(self.request_id) > 256:
            raise ProtocolError(f"invalid request_id {self.request_id!r}: expected 1-256 characters")
        given = [n for n in ("prompt", "token_ids", "messages") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ProtocolError(f"request {self.request_id}: give exactly one of prompt, token_ids, "
                                f"messages (got {', '.join(given) or 'none'})")
        if self.messages is not None:
            for i, m in enumerate(self.messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                        or not isinstance(m.get("content"), str):
                    raise ProtocolError(f"invalid messages[{i}]={m!r}: expected "
                                        "{'role': str, 'content': str}")
        if self.token_ids is not None and not self.token_ids:
            raise ProtocolError("invalid token_ids=[]: expected at least one token")
        if self.prompt is not None and not self.prompt:
            raise ProtocolError("invalid prompt='': expected a non-empty string")
        if self.timeout_ms is not None and self.timeout_ms <= 0:
            raise ProtocolError(f"invalid timeout_ms={self.timeout_ms!r}: expected > 0")
        SamplingParams.from_dict(self.sampling)   # validates, naming the field and value


@message(2)
class Cancel(Message):
    request_id: str


@message(3)
class Ping(Message):
    nonce: int = 0
    metrics: bool = False     # ask for the Prometheus text in Pong.stats["prometheus"]


@message(10)
class Accepted(Message):
    request_id: str


@message(11)
class Tokens(Message):
    """Output tokens, in order; ``index`` is the position of the first one in the output."""
    request_id: str
    index: int
    token_ids: list[int]
    text: str = ""
    attempt: int = 0


@message(12)
class Final(Message):
    request_id: str
    finish_reason: str
    usage: dict = field(default_factory=dict)     # prompt_tokens, completion_tokens
    timings: dict = field(default_factory=dict)   # seconds: queue, prefill, kv_transfer, ttft, total


@message(13)
class Error(Message):
    request_id: str
    code: str
    message: str
    retryable: bool = False


@message(14)
class Pong(Message):
    nonce: int = 0
    stats: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# worker -> broker

@message(20)
class Ready(Message):
    worker_id: str
    role: str                          # context | generation | both
    model: str
    slots: int                         # max concurrent requests
    kv_blocks: int                     # KV blocks in the pool
    block_size: int
    max_seq_len: int
    transfer: dict = field(default_factory=dict)   # backend, endpoint
    pid: int = 0
    heartbeat_ms: int = 1000


@message(21)
class Heartbeat(Message):
    free_slots: int = 0
    free_blocks: int = 0
    leases: int = 0
    max_decode_batch: int = 0     # largest decode batch since the previous heartbeat


@message(22)
class ContextDone(Message):
    request_id: str
    attempt: int
    first_token: int
    first_text: str
    prompt_token_ids: list[int]
    kv_handle: dict = field(default_factory=dict)
    finish_reason: Optional[str] = None   # set when the first token already ends the request
    prefill_s: float = 0.0


@message(23)
class KvPulled(Message):
    request_id: str
    attempt: int
    kv_transfer_s: float = 0.0
    nbytes: int = 0


@message(24)
class Finished(Message):
    request_id: str
    attempt: int
    finish_reason: str
    completion_tokens: int
    prompt_tokens: int = 0
    prefill_s: float = 0.0


@message(25)
class Failed(Message):
    request_id: str
    attempt: int
    code: str
    message: str
    retryable: bool = False


@message(26)
class Disconnect(Message):
    reason: str = ""


# ---------------------------------------------------------------------------------------------
# broker -> worker

@message(30)
class Prefill(Message):
    """Context phase: prefill, sample the first token, hold the KV blocks for ``lease_ms``."""
    request_id: str
    attempt: int
    prompt: Optional[str] = None
    token_ids: Optional[list[int]] = None
    messages: Optional[list[dict]] = None
    sampling: dict = field(default_factory=dict)
    lease_ms: int = 30000


@message(31)
class Decode(Message):
    """Generation phase: pull the KV through ``kv_handle``, then decode after ``first_token``."""
    request_id: str
    attempt: int
    prompt_token_ids: list[int]
    first_token: int
    first_text: str
    kv_handle: dict
    sampling: dict = field(default_factory=dict)


@message(32)
class Generate(Message):
    """The whole request on one worker (role ``both``)."""
    request_id: str
    attempt: int
    prompt: Optional[str] = None
    token_ids: Optional[list[int]] = None
    messages: Optional[list[dict]] = None
    sampling: dict = field(default_factory=dict)


@message(33)
class KvRelease(Message):
    request_id: str
    attempt: int


@message(34)
class CancelWork(Message):
    request_id: str
    attempt: int


@message(35)
class BrokerHeartbeat(Message):
    pass


@message(36)
class Reconnect(Message):
    """The broker does not know this worker (it expired it, or restarted): send Ready again."""
    reason: str = ""
