"""The wire protocol between clients, the broker and workers: every message, its fields, and the
shared vocabulary (error codes, finish reasons, sampling parameters). Import the protocol from
here only; its encoding machinery lives in ``broker/wire.py`` (package-private, re-exported here).

A message is one frame after the ROUTER identity: ``VERSION + command byte + msgpack map``. The
version tag, the one-byte command and the body share the frame (a frame costs a ZeroMQ call and a
Python object at each end). Every message is a frozen ``msgspec.Struct`` registered under its
command; ``encode()`` gives its frames and ``decode()`` reads them with the class's typed decoder.

Several messages for one peer may travel as one *batch*: ``VERSION + BATCH + msgpack array of
[command, map] pairs`` (``encode_many``). A busy broker handles a dozen messages per request, and
a ZeroMQ message costs far more in Python than a map in a batch, so senders batch what they have
ready for the same peer (the order within a batch is the order of sending) and every receiver
reads with ``decode_all``, which gives the messages of a batch or of a single message alike.

Unknown keys in a body are ignored, so an optional field needs no version bump; a wrong version,
an unknown command, a missing field, a field of the wrong type (a bool is not an int) or a body
nested too deeply raises ``ProtocolError``. Prompt token ids travel packed as little-endian
uint32s (``TokenIds``: a msgpack bin), so the broker's cost does not grow with the prompt; output
token ids, a few per message, are msgpack arrays of ints.

Nothing here is ever pickled: bodies are msgpack maps of plain values. This module does no I/O.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

from msgspec import Meta, field

from broker.kv_keys import KEY_BYTES
from broker.wire import (BATCH, BATCH_MAX, HEADER_LEN, MAX_DEPTH, MAX_ID_CHARS, MAX_ITEMS,  # noqa: F401
                         MAX_KEYS, MAX_MESSAGE_BYTES, MAX_TOKEN_IDS, U32, U63, U64, VERSION, Map,
                         Maps, Message, Name, ProtocolError, RequestId, Text, TokenIds, TokenList,
                         _short, decode, decode_all, encode_many, encode_batches, header, message,
                         request_id_of, token_fields)

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
    UNKNOWN_MODEL = "UNKNOWN_MODEL"          # no registered worker serves the model it names
    PROTOCOL = "PROTOCOL"
    INTERNAL = "INTERNAL"


class Finish:
    STOP = "stop"          # stop token or stop string
    LENGTH = "length"      # max_tokens or the model's context reached
    CANCELLED = "cancelled"


# ---------------------------------------------------------------------------------------------
# sampling parameters: validated at the client, at the broker and at the worker alike

def _bad_param(name: str, value: Any, expected: str) -> ProtocolError:
    return ProtocolError(f"invalid sampling parameter {name}={_short(value)}: expected {expected}")


def _is_int(v: Any) -> bool:
    return type(v) is int or (isinstance(v, int) and not isinstance(v, bool))


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: Optional[int] = None  # a request that cannot fit its prompt plus this is refused
    default_max_tokens: int = 64      # when max_tokens is absent: this, clipped to the context
    temperature: float = 0.0          # 0 means greedy
    top_k: int = 0                    # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0                # 0 means off; else keep tokens >= min_p * the most likely's
    seed: Optional[int] = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0     # OpenAI's: minus this for every token already in the output
    frequency_penalty: float = 0.0    # OpenAI's: minus this times the token's count in the output
    min_tokens: int = 0               # no EOS, stop token or stop string before this many tokens
    logit_bias: tuple = ()            # (token id, bias in [-100, 100]) pairs added to the logits
    stop: tuple = ()                  # stop strings
    stop_token_ids: tuple = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        bad, is_int, is_num = _bad_param, _is_int, _is_num
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "an integer >= 1 or null")
        if not is_int(self.default_max_tokens) or self.default_max_tokens < 1:
            raise bad("default_max_tokens", self.default_max_tokens, "an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "a number >= 0")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", self.top_k, "an integer >= 0 (0 turns it off)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "a number in (0, 1]")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "a number in [0, 1] (0 turns it off)")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", self.seed, "an integer in [0, 2**63) or null")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "a number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                raise bad(name, v, "a number in [-2, 2]")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= MAX_MIN_TOKENS:
            raise bad("min_tokens", self.min_tokens, f"an integer in [0, {MAX_MIN_TOKENS}]")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
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

    @property
    def uses_history(self) -> bool:
        """Whether sampling reads the prompt and output so far (the penalties)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty or self.frequency_penalty)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SamplingParams":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ProtocolError(f"invalid sampling parameters {_short(d)}: expected a map")
        names = _SAMPLING_NAMES
        if not names.issuperset(d):
            unknown = sorted(set(d) - names)
            raise ProtocolError(f"unknown sampling parameter {unknown[0]!r}; known: {', '.join(sorted(names))}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        d["logit_bias"] = [list(pair) for pair in self.logit_bias]
        return d


MAX_MIN_TOKENS = 1 << 20
MAX_LOGIT_BIAS = 1024       # entries; OpenAI takes 300


def _logit_bias(v: Any) -> tuple:
    """``{token id: bias}`` (JSON's string keys too) or ``[[id, bias], ...]`` as sorted pairs."""
    pairs = list(v.items()) if isinstance(v, dict) else v
    if not isinstance(pairs, (list, tuple)) or len(pairs) > MAX_LOGIT_BIAS:
        raise _bad_param("logit_bias", v, f"a map of at most {MAX_LOGIT_BIAS} token ids to biases")
    out = {}
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise _bad_param("logit_bias", v, "token id -> bias pairs")
        tid, bias = pair
        if isinstance(tid, str) and tid.isdigit() and len(tid) < 12:
            tid = int(tid)
        if not _is_int(tid) or not 0 <= tid < 2**32:
            raise _bad_param("logit_bias", tid, "token ids (integers >= 0) as keys")
        if not _is_num(bias) or not -100 <= bias <= 100:
            raise _bad_param(f"logit_bias[{tid}]", bias, "a number in [-100, 100]")
        out[tid] = float(bias)
    return tuple(sorted(out.items()))


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
# client <-> broker

@message(1)
class Submit(Message):
    request_id: RequestId
    prompt: Optional[str] = None
    token_ids: Optional[TokenIds] = None
    messages: Optional[Maps] = None
    sampling: Map = field(default_factory=dict)
    timeout_ms: Optional[U63] = None        # deadline, relative to the broker's receipt
    # resume: the output tokens the client already has from an earlier run of this request (its
    # broker restarted) and the length of the text received with them; generation continues
    # after them, and they count in max_tokens and usage
    output_ids: Optional[TokenIds] = None
    output_chars: Optional[U63] = None
    # the model to run on (a worker's Ready.model); None: the broker's default (broker/pool.py)
    model: Optional[Name] = None

    def __post_init__(self) -> None:
        token_fields(self, "token_ids", "output_ids")
        if not self.request_id or len(self.request_id) > 256:
            raise ProtocolError(f"invalid request_id {_short(self.request_id)}: expected 1-256 characters")
        if self.model is not None and not (isinstance(self.model, str) and 0 < len(self.model) <= MAX_ID_CHARS):
            raise ProtocolError(f"invalid model={_short(self.model)}: expected a name of 1-{MAX_ID_CHARS} characters")
        given = [n for n in ("prompt", "token_ids", "messages") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ProtocolError(f"request {self.request_id}: give exactly one of prompt, token_ids, "
                                f"messages (got {', '.join(given) or 'none'})")
        if self.messages is not None:
            for i, m in enumerate(self.messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                        or not isinstance(m.get("content"), str):
                    raise ProtocolError(f"invalid messages[{i}]={_short(m)}: expected "
                                        "{'role': str, 'content': str}")
        if self.token_ids is not None and not self.token_ids:
            raise ProtocolError("invalid token_ids=[]: expected at least one token")
        if self.prompt is not None and not self.prompt:
            raise ProtocolError("invalid prompt='': expected a non-empty string")
        if self.timeout_ms is not None and self.timeout_ms <= 0:
            raise ProtocolError(f"invalid timeout_ms={self.timeout_ms!r}: expected > 0")
        if self.output_ids and (self.output_chars is None or self.output_chars < 0):
            raise ProtocolError(f"invalid output_chars={self.output_chars!r}: with output_ids, expected "
                                "the number (>= 0) of text characters received with them")
        check_sampling(self.sampling)   # validates, naming the field and value


@message(2)
class Cancel(Message):
    request_id: RequestId


@message(3)
class Ping(Message):
    nonce: U64 = 0
    metrics: bool = False     # ask for the Prometheus text in Pong.stats["prometheus"]


@message(10)
class Accepted(Message):
    request_id: RequestId
    broker: RequestId = ""   # this broker's instance id (random per start; ``Pong.stats["instance"]``
                            # too): a client that meets another has met a restart that lost its requests


@message(11)
class Tokens(Message):
    """Output tokens, in order; ``index`` is the position of the first one in the output."""
    request_id: RequestId
    index: U32
    token_ids: TokenList
    text: str = ""
    attempt: U32 = 0


@message(12)
class Final(Message):
    """The end of a request. It may carry the last output tokens (``token_ids`` from ``index``,
    as a ``Tokens`` message would): a request's last step then costs one message, not two."""
    request_id: RequestId
    finish_reason: Annotated[str, Meta(max_length=32)]
    usage: Map = field(default_factory=dict)     # prompt_tokens, completion_tokens
    timings: Map = field(default_factory=dict)   # seconds: queue, prefill, kv_transfer, ttft, total
    index: U32 = 0
    token_ids: TokenList = field(default_factory=list)
    text: str = ""


@message(13)
class Error(Message):
    request_id: RequestId
    code: Annotated[str, Meta(max_length=64)]
    message: Text
    retryable: bool = False


@message(14)
class Pong(Message):
    nonce: U64 = 0
    stats: Map = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# worker -> broker

MAX_SLOTS = 1 << 20                        # Ready.slots at most
MAX_TOKENS_PER_BLOCK = (1 << 31) - 1       # Ready.tokens_per_block at most (a config integer)
MAX_KV_EVENTS = 1024                       # keys in one KvEvents field at most
MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS = 10, 60_000   # Ready.heartbeat_ms: a worker silent for
                                          # liveness x this long is expired, so it is bounded


@message(20)
class Ready(Message):
    worker_id: Name
    role: Literal["context", "generation", "both"]
    model: Name
    slots: Annotated[int, Meta(ge=1, le=MAX_SLOTS)]            # max concurrent requests
    kv_blocks: Annotated[int, Meta(ge=0, lt=1 << 31)]          # KV blocks in the pool
    transfer: Map = field(default_factory=dict)   # backend, endpoint
    pid: Annotated[int, Meta(ge=0, lt=1 << 31)] = 0
    heartbeat_ms: Annotated[int, Meta(ge=MIN_HEARTBEAT_MS, le=MAX_HEARTBEAT_MS)] = 1000
    # its KV block size: the broker computes a token prompt's block keys with it (0: unknown)
    tokens_per_block: Annotated[int, Meta(ge=0, le=MAX_TOKENS_PER_BLOCK)] = 0


@message(21)
class Heartbeat(Message):
    free_blocks: U32 = 0
    leases: U32 = 0
    max_decode_batch: U32 = 0     # largest decode batch since the previous heartbeat


@message(22)
class ContextDone(Message):
    request_id: RequestId
    attempt: U32
    first_token: U32
    first_text: str
    prompt_token_ids: TokenIds
    kv_handle: Map = field(default_factory=dict)
    finish_reason: Optional[str] = None   # set when the first token already ends the request
    prefill_s: float = 0.0
    cached_tokens: int = 0                # prompt tokens whose KV came from the prefix cache

    def __post_init__(self) -> None:
        token_fields(self, "prompt_token_ids")


@message(23)
class KvPulled(Message):
    request_id: RequestId
    attempt: U32
    kv_transfer_s: float = 0.0
    nbytes: U63 = 0


@message(24)
class Finished(Message):
    """The generation side is done. Like ``Final``, it may carry the last tokens."""
    request_id: RequestId
    attempt: U32
    finish_reason: Annotated[str, Meta(max_length=32)]
    prompt_tokens: U32 = 0
    prefill_s: float = 0.0
    index: U32 = 0
    token_ids: TokenList = field(default_factory=list)
    text: str = ""
    cached_tokens: int = 0


@message(25)
class Failed(Message):
    request_id: RequestId
    attempt: U32
    code: Annotated[str, Meta(max_length=64)]
    message: Text
    retryable: bool = False


@message(26)
class Disconnect(Message):
    reason: Text = ""


@message(27)
class KvEvents(Message):
    """KV events: the keys of cached KV blocks (``broker/kv_keys.py``) this worker's prefix cache
    now holds (``stored``) and no longer holds (``removed``), each packed as ``KEY_BYTES``-byte
    keys, at most ``MAX_KV_EVENTS`` per field (more go in more messages). ``clear``: forget every
    key this worker published before (it sends them all again after registering). Sent in the
    same batch as the worker's other messages (ContextDone, Finished, Heartbeat), never alone
    on a timer of its own."""
    stored: Annotated[bytes, Meta(max_length=KEY_BYTES * MAX_KV_EVENTS)] = b""
    removed: Annotated[bytes, Meta(max_length=KEY_BYTES * MAX_KV_EVENTS)] = b""
    clear: bool = False

    def __post_init__(self) -> None:
        for name in ("stored", "removed"):
            if len(getattr(self, name)) % KEY_BYTES:
                raise ProtocolError(f"invalid KvEvents.{name} of {len(getattr(self, name))} bytes: "
                                    f"expected a multiple of {KEY_BYTES} (packed keys)")

    @classmethod
    def of(cls, stored=(), removed=(), clear: bool = False) -> list["KvEvents"]:
        """The messages that carry these keys (lists of ``KEY_BYTES``-byte keys)."""
        stored, removed, n = list(stored), list(removed), MAX_KV_EVENTS
        out = [cls(b"".join(stored[i:i + n]), b"".join(removed[i:i + n]), clear and i == 0)
               for i in range(0, max(len(stored), len(removed)), n)]
        return out or ([cls(clear=True)] if clear else [])

    def keys(self, name: str) -> list:
        data = getattr(self, name)
        return [data[i:i + KEY_BYTES] for i in range(0, len(data), KEY_BYTES)]


# ---------------------------------------------------------------------------------------------
# broker -> worker

@message(30)
class Prefill(Message):
    """Context phase: prefill, sample the first token, hold the KV blocks for ``lease_ms``."""
    request_id: RequestId
    attempt: U32
    prompt: Optional[str] = None
    token_ids: Optional[TokenIds] = None
    messages: Optional[Maps] = None
    sampling: Map = field(default_factory=dict)
    lease_ms: U63 = 30000

    def __post_init__(self) -> None:
        token_fields(self, "token_ids")


@message(31)
class Decode(Message):
    """Generation phase: pull the KV through ``kv_handle``, then decode after ``first_token``."""
    request_id: RequestId
    attempt: U32
    prompt_token_ids: TokenIds
    first_token: U32
    first_text: str
    kv_handle: Map
    sampling: Map = field(default_factory=dict)
    # the request's text form, when it came as text (kv-aware routing only): the worker publishes
    # the text keys of the blocks it pulls (broker/kv_keys.py); it decodes prompt_token_ids
    prompt: Optional[str] = None
    messages: Optional[Maps] = None

    def __post_init__(self) -> None:
        token_fields(self, "prompt_token_ids")


@message(32)
class Generate(Message):
    """The whole request on one worker (role ``both``), or a continuation (role ``both`` or
    ``generation``): with ``output_ids``, the worker prefills the prompt and those tokens itself
    and samples what follows them, as if it had generated them (a migrated stream, a resume);
    ``output_chars`` is the length of the text the client has for them (text held back for a
    possible stop string is not in it)."""
    request_id: RequestId
    attempt: U32
    prompt: Optional[str] = None
    token_ids: Optional[TokenIds] = None
    messages: Optional[Maps] = None
    sampling: Map = field(default_factory=dict)
    output_ids: Optional[TokenIds] = None
    output_chars: U63 = 0

    def __post_init__(self) -> None:
        token_fields(self, "token_ids", "output_ids")


@message(33)
class KvRelease(Message):
    request_id: RequestId
    attempt: U32


@message(34)
class CancelWork(Message):
    request_id: RequestId
    attempt: U32


@message(35)
class BrokerHeartbeat(Message):
    pass


@message(36)
class Reconnect(Message):
    """The broker does not know this worker (it expired it, or restarted): send Ready again."""
    reason: Text = ""
