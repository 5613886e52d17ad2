"""The wire protocol between clients, the broker and workers. The protocol lives only here.

Frames after the ROUTER identity: ``[VERSION + command byte + msgpack map][*raw frames]``: the
version tag, the one-byte command and the body share the first frame (a frame costs a ZeroMQ
call and a Python object at each end: three frames per message cost the broker twice the time of
one). Every message is a frozen dataclass with ``encode()`` (to frames) and ``decode()`` (from
frames).

Several messages for one peer may travel as one *batch*: ``[VERSION + BATCH + msgpack array of
[command, map] pairs]`` (``encode_many``). A busy broker handles a dozen messages per request, and
a ZeroMQ message costs far more in Python than a map in a batch, so senders batch what they have
ready for the same peer (the order within a batch is the order of sending) and every receiver
reads with ``decode_all``, which gives the messages of a batch or of a single message alike.
Unknown keys in a body are ignored, so an optional field needs no version bump; a wrong version,
an unknown command, a missing field or a field of the wrong type raises ``ProtocolError``.

Nothing here is ever pickled: bodies are msgpack maps of plain values, bulk bytes ride as extra
frames. This module does no I/O.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

import msgpack

VERSION = b"DSRV2"      # DSRV2: one header frame, and peers must accept batches
BATCH = 9               # the command byte of a batch envelope (no Message class of its own)
HEADER_LEN = len(VERSION) + 1     # the version tag and the command byte before the body
_BATCH_HEAD = VERSION + bytes([BATCH])


def header(cmd: int) -> bytes:
    """The bytes a message of this command starts with."""
    return VERSION + bytes([cmd])


class ProtocolError(ValueError):
    """A frame sequence that is not a valid message of this protocol version. ``request_id`` is
    the request it was about when that could be read (so a client can be told which one failed)."""

    def __init__(self, message: str, request_id: str = ""):
        super().__init__(message)
        self.request_id = request_id


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

def _bad_param(name: str, value: Any, expected: str) -> ProtocolError:
    return ProtocolError(f"invalid sampling parameter {name}={value!r}: expected {expected}")


def _is_int(v: Any) -> bool:
    return type(v) is int or (isinstance(v, int) and not isinstance(v, bool))


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


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
        bad, is_int, is_num = _bad_param, _is_int, _is_num
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
        names = _SAMPLING_NAMES
        if not names.issuperset(d):
            unknown = sorted(set(d) - names)
            raise ProtocolError(f"unknown sampling parameter {unknown[0]!r}; known: {', '.join(sorted(names))}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d


_SAMPLING_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))

# Sampling maps seen valid, keyed by (name, exact type, value) triples: clients send the same few
# maps again and again, and building SamplingParams to validate one costs the broker more than
# all the rest of decoding a Submit. The exact type is part of the key because 1 == 1.0 == True.
# A map with an unhashable value (a stop list) is checked every time; the table stays small.
_VALID_SAMPLING: dict = {}
_VALID_SAMPLING_MAX = 1024


def check_sampling(d: Optional[dict]) -> None:
    """Raise ProtocolError unless ``d`` is a valid sampling map (as SamplingParams.from_dict)."""
    if type(d) is dict:
        try:
            key = tuple(zip(d, map(type, d.values()), d.values()))
            if key in _VALID_SAMPLING:
                return
        except TypeError:        # an unhashable value
            key = None
    else:
        key = None
    SamplingParams.from_dict(d)
    if key is not None and len(_VALID_SAMPLING) < _VALID_SAMPLING_MAX:
        _VALID_SAMPLING[key] = True


# ---------------------------------------------------------------------------------------------
# message machinery

_REGISTRY: dict[int, type["Message"]] = {}

# The broker handles a dozen messages per request, so decode and encode are its hot path: the
# per-field type checks are built once per class from the annotations (below), and a decoded
# message is built without the dataclass __init__ (see Message.from_body).

_INT_ONLY = frozenset((int,))


def _all_ints(v: Any) -> bool:
    # set(map(type, ...)) runs in C; `type(x) is int` also rejects bools (a subclass of int)
    return isinstance(v, (list, tuple)) and set(map(type, v)) <= _INT_ONLY


def _checker(tp: Any) -> Callable[[Any], bool]:
    """A structural check of a decoded value against a field annotation, built once per field."""
    if tp is Any:
        return lambda v: True
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if len(args) == 2 and type(None) in args:          # Optional[X]
            inner = _checker(next(a for a in args if a is not type(None)))
            return lambda v: v is None or inner(v)
        checks = [_checker(a) for a in args]
        return lambda v: any(c(v) for c in checks)
    if tp is type(None):
        return lambda v: v is None
    if tp is float:
        return lambda v: type(v) is float or type(v) is int or (
            isinstance(v, (int, float)) and not isinstance(v, bool))
    if tp is int:
        return lambda v: type(v) is int or (isinstance(v, int) and not isinstance(v, bool))
    if tp is bool or tp is str or tp is dict:
        return lambda v: isinstance(v, tp)
    if origin in (list, tuple) or tp in (list, tuple):
        args = typing.get_args(tp)
        if args and args[0] is int:
            return _all_ints
        if args and args[0] is not Ellipsis:
            inner = _checker(args[0])
            return lambda v: isinstance(v, (list, tuple)) and all(map(inner, v))
        return lambda v: isinstance(v, (list, tuple))
    if origin is dict:
        return lambda v: isinstance(v, dict)
    if isinstance(tp, type):
        return lambda v: isinstance(v, tp)
    return lambda v: True


# One msgpack Packer per thread: packb() builds (and frees) a Packer and its buffer per call,
# which costs as much as the packing itself; a Packer is not safe to share between threads.
_packers = threading.local()


def _pack(obj: Any) -> bytes:
    try:
        return _packers.packer.pack(obj)
    except AttributeError:
        _packers.packer = msgpack.Packer(use_bin_type=True)
        return _packers.packer.pack(obj)


def _exact_types(tp: Any) -> Optional[frozenset]:
    """The exact Python types msgpack gives for a valid value of this annotation, or None when
    no such set says enough. Used by the decode fast path: a type() lookup in C per field."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        sets = [_exact_types(a) for a in typing.get_args(tp)]
        return None if None in sets else frozenset().union(*sets)
    if tp is type(None):
        return frozenset((type(None),))
    if tp is float:
        return frozenset((float, int))
    if tp in (int, str, bool, dict) or origin is dict:
        return frozenset((origin or tp,))
    if origin in (list, tuple) or tp in (list, tuple):
        return frozenset((list, tuple))   # the elements are checked by the field's full checker
    return None


def _needs_deep_check(tp: Any) -> bool:
    """Whether a value of the right exact type may still be wrong (a list's elements)."""
    if typing.get_origin(tp) is typing.Union:
        return any(_needs_deep_check(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    return typing.get_origin(tp) in (list, tuple) and bool(args) and args[0] is not Ellipsis


_REQUIRED = object()   # marks a field without a default in Message._spec
_contains = frozenset.__contains__


class Message:
    CMD: ClassVar[int] = 0
    # per-class tables filled in by @message, so that no message walks dataclasses.fields()
    _names: ClassVar[tuple] = ()          # field names, without "frames"
    _spec: ClassVar[tuple] = ()           # (name, check, default value | factory | _REQUIRED, is factory)
    _has_frames: ClassVar[bool] = False
    _head: ClassVar[bytes] = b""          # VERSION + command byte
    _fast_types: ClassVar[Optional[tuple]] = None   # per field: exact types of a valid value
    _deep: ClassVar[tuple] = ()                     # (name, check) of fields also checked in full
    _post_init: ClassVar[Optional[Callable]] = None

    def body(self) -> dict:
        return {name: getattr(self, name) for name in self._names}

    def wire_body(self) -> dict:
        """The map that goes on the wire (a view of the message: do not modify it)."""
        # a message without raw frames holds exactly its fields in __dict__ (the dataclass
        # __init__ and from_body set nothing else): pack it as it is, with no copy
        return self.body() if self._has_frames else self.__dict__

    def encode(self) -> list:
        frames = [self._head + _pack(self.wire_body())]
        if self._has_frames and self.frames:
            frames.extend(self.frames)
        return frames

    @classmethod
    def from_body(cls, body: dict, frames: Sequence = ()) -> "Message":
        """A decoded body to a message: every field checked against its annotation."""
        # Fast path, for a body that holds every field with a value of an exact expected type
        # (what encode() sends): the lookups and type checks run in C, with a full check only
        # for fields such as token id lists. Anything else takes the field-by-field path, which
        # fills in defaults and names the missing or bad field.
        names, fast_types = cls._names, cls._fast_types
        if fast_types is not None:
            try:
                values = tuple(map(body.__getitem__, names))
            except KeyError:
                values = None
            if values is not None and all(map(_contains, fast_types, map(type, values))):
                for name, check in cls._deep:
                    if not check(body[name]):
                        raise ProtocolError(f"{cls.__name__}.{name}: bad value {body[name]!r}")
                # a body holding exactly the fields (the usual case) becomes the message's dict
                return cls._build(body if len(body) == len(names) and not cls._has_frames
                                  else dict(zip(names, values)), frames)
        values = {}
        for name, check, default, factory in cls._spec:
            if name in body:
                v = body[name]
                if not check(v):
                    raise ProtocolError(f"{cls.__name__}.{name}: bad value {v!r}")
                values[name] = v
            elif default is _REQUIRED:
                raise ProtocolError(f"{cls.__name__}: missing field {name!r}")
            else:
                values[name] = default() if factory else default
        return cls._build(values, frames)

    @classmethod
    def _build(cls, values: dict, frames: Sequence) -> "Message":
        # What the frozen dataclass __init__ does (set every field, then __post_init__), without
        # its object.__setattr__ per field, which costs about as much as the rest of the decode.
        if cls._has_frames:
            values["frames"] = tuple(frames)
        msg = cls.__new__(cls)
        msg.__dict__.update(values)
        if cls._post_init is not None:
            try:
                cls._post_init(msg)
            except ProtocolError:
                raise
            except (TypeError, ValueError) as e:
                raise ProtocolError(f"{cls.__name__}: {e}") from e
        return msg


def message(cmd: int):
    """Class decorator: a frozen dataclass registered under a one-byte command."""
    def wrap(cls):
        cls = dataclass(frozen=True)(cls)
        cls.CMD = cmd
        if cmd in _REGISTRY:
            raise RuntimeError(f"command {cmd} registered twice")
        _REGISTRY[cmd] = cls
        hints = typing.get_type_hints(cls)
        fields = [f for f in dataclasses.fields(cls) if f.name != "frames"]
        cls._names = tuple(f.name for f in fields)
        cls._spec = tuple(
            (f.name, _checker(hints[f.name]),
             f.default_factory if f.default_factory is not dataclasses.MISSING
             else _REQUIRED if f.default is dataclasses.MISSING else f.default,
             f.default_factory is not dataclasses.MISSING)
            for f in fields)
        cls._has_frames = len(fields) != len(dataclasses.fields(cls))
        cls._head = header(cmd)
        exact = tuple(_exact_types(hints[f.name]) for f in fields)
        cls._fast_types = None if None in exact else exact
        cls._deep = tuple((f.name, _checker(hints[f.name])) for f in fields if _needs_deep_check(hints[f.name]))
        cls._post_init = getattr(cls, "__post_init__", None)
        cls.__init__ = _fast_init(cls)
        return cls
    return wrap


_FACTORY = object()   # "use the field's default factory" in a generated __init__


def _fast_init(cls) -> Callable:
    """The frozen dataclass's __init__ (same signature, defaults and __post_init__), writing the
    instance dict directly instead of one object.__setattr__ per field: half the cost, and the
    broker builds half a dozen messages per request."""
    params, lines, ns = [], [], {"_FACTORY": _FACTORY}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            ns[f"_f_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_FACTORY")
            lines.append(f"    if {f.name} is _FACTORY:\n        {f.name} = _f_{f.name}()")
        elif f.default is not dataclasses.MISSING:
            ns[f"_d_{f.name}"] = f.default
            params.append(f"{f.name}=_d_{f.name}")
        else:
            params.append(f.name)
        lines.append(f"    d[{f.name!r}] = {f.name}")
    if getattr(cls, "__post_init__", None) is not None:
        lines.append("    self.__post_init__()")
    src = f"def __init__(self, {', '.join(params)}):\n    d = self.__dict__\n" + "\n".join(lines) + "\n"
    exec(src, ns)
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    return init


def _first(frames: Sequence) -> bytes:
    """The header-and-body frame as bytes, checked for the version tag and a command byte."""
    if not frames:
        raise ProtocolError("empty message: expected a frame with the version, command and body")
    first = frames[0]
    if type(first) is not bytes:   # a zmq Frame (copy=False) or another buffer
        first = bytes(first.buffer) if hasattr(first, "buffer") else bytes(first)
    if first[:len(VERSION)] != VERSION:
        raise ProtocolError(f"wrong protocol version {first[:len(VERSION)]!r}, expected {VERSION!r}")
    if len(first) < HEADER_LEN:
        raise ProtocolError("message has no command byte after the version tag")
    return first


def decode(frames: Sequence) -> Message:
    """Frames (without the ROUTER identity) to a message; raises ProtocolError."""
    return _decode(_first(frames), frames)


def _decode(first: bytes, frames: Sequence) -> Message:
    cls = _REGISTRY.get(first[HEADER_LEN - 1])
    if cls is None:
        raise ProtocolError(f"unknown command {first[HEADER_LEN - 1]}")
    try:
        body = msgpack.unpackb(memoryview(first)[HEADER_LEN:], raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises a zoo of exception types
        raise ProtocolError(f"undecodable body for {cls.__name__}: {e}") from e
    if not isinstance(body, dict):
        raise ProtocolError(f"body of {cls.__name__} is not a map")
    try:
        return cls.from_body(body, frames[1:])
    except ProtocolError as e:      # a readable body with a bad field: say which request it was
        _name_request(e, body)
        raise


def _name_request(e: ProtocolError, body: dict) -> None:
    if not e.request_id:
        rid = body.get("request_id")
        e.request_id = rid if type(rid) is str else ""


def encode_many(msgs: Sequence[Message]) -> list:
    """Messages for one peer as the frames of one ZeroMQ message: a single message as itself,
    several as a batch. Messages with raw frames cannot ride in a batch."""
    if len(msgs) == 1:
        return msgs[0].encode()
    if not msgs:
        raise ValueError("encode_many needs at least one message")
    items = []
    for m in msgs:
        if m._has_frames and m.frames:
            raise ValueError(f"{type(m).__name__} carries raw frames and cannot be batched")
        items.append((m.CMD, m.wire_body()))
    return [_BATCH_HEAD + _pack(items)]


BATCH_MAX = 512   # messages per batch at most: a receiver decodes a whole batch before serving it


def encode_batches(msgs: Sequence[Message]) -> Iterator[list]:
    """Messages for one peer as few ZeroMQ messages as ``BATCH_MAX`` allows, in order."""
    for i in range(0, len(msgs), BATCH_MAX):
        yield encode_many(msgs[i:i + BATCH_MAX])


def decode_all(frames: Sequence) -> list:
    """Frames (without the ROUTER identity) to the messages they carry, in order: the one
    message, or every message of a batch. Raises ProtocolError for a bad frame sequence or
    envelope; a bad message inside a good batch becomes a ProtocolError *in its place*, so the
    others are still served (callers check ``isinstance(m, ProtocolError)``)."""
    first = _first(frames)
    if first[HEADER_LEN - 1] != BATCH:
        return [_decode(first, frames)]
    if len(frames) != 1:
        raise ProtocolError(f"a batch is one frame, got {len(frames)}")
    try:
        items = msgpack.unpackb(memoryview(first)[HEADER_LEN:], raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises a zoo of exception types
        raise ProtocolError(f"undecodable batch: {e}") from e
    if type(items) is not list:
        raise ProtocolError("batch body is not an array")
    out: list = []
    registry = _REGISTRY
    for i, item in enumerate(items):
        try:
            if type(item) is not list or len(item) != 2 or type(item[1]) is not dict:
                raise ProtocolError(f"batch item {i} is not a [command, map] pair")
            cmd, b = item
            cls = registry.get(cmd) if type(cmd) is int else None
            if cls is None:
                raise ProtocolError(f"batch item {i}: unknown command {cmd!r}")
            if cls._has_frames:
                raise ProtocolError(f"batch item {i}: {cls.__name__} cannot ride in a batch")
            out.append(cls.from_body(b))
        except ProtocolError as e:
            if type(item) is list and len(item) == 2 and type(item[1]) is dict:
                _name_request(e, item[1])
            out.append(e)
    return out


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
        check_sampling(self.sampling)   # validates, naming the field and value


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
    """The end of a request. It may carry the last output tokens (``token_ids`` from ``index``,
    as a ``Tokens`` message would): a request's last step then costs one message, not two."""
    request_id: str
    finish_reason: str
    usage: dict = field(default_factory=dict)     # prompt_tokens, completion_tokens
    timings: dict = field(default_factory=dict)   # seconds: queue, prefill, kv_transfer, ttft, total
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""


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
    """The generation side is done. Like ``Final``, it may carry the last tokens."""
    request_id: str
    attempt: int
    finish_reason: str
    completion_tokens: int
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""


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
