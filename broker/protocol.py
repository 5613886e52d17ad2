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

from typing import Annotated, Literal, Optional

import msgspec
from msgspec import Meta, field

from broker.kv_keys import KEY_BYTES
from broker.sampling import (MAX_BAD_WORD_CHARS, MAX_BAD_WORDS, MAX_LOGIT_BIAS,  # noqa: F401
                             MAX_MIN_TOKENS, MAX_TOP_LOGPROBS, SamplingParams, check_sampling)
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
# log-probabilities of output tokens (``SamplingParams.logprobs``): one ``Logprobs`` per token,
# beside the token ids of a Tokens, Final, ContextDone or Finished message. The prompt's
# (``SamplingParams.prompt_logprobs``) ride in ``prompt_logprobs`` of the message that carries
# output token 0, one per prompt token; the first has no log-probability (its entry says 0.0).

MIN_LOGPROB = -9999.0       # what -inf (and NaN) become, as vLLM reports them
MAX_TOKEN_BYTES = 1024      # one token's text, in bytes
MAX_PROMPT_LOGPROBS = 1 << 17   # prompt tokens x (alternatives + 1): a few MB on the wire at most
Logprob = Annotated[float, Meta(ge=MIN_LOGPROB, le=0.0)]


class TokenLogprob(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A token, its log-probability, and its own bytes (a piece of UTF-8 text, possibly part of
    a character; what OpenAI's ``bytes`` shows)."""
    token_id: U32
    logprob: Logprob
    text: Annotated[bytes, Meta(max_length=MAX_TOKEN_BYTES)] = b""


class Logprobs(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One output token's log-probability, and the ``top`` most likely tokens at its position
    (most likely first; the sampled token is among them only if it is that likely)."""
    token: TokenLogprob
    top: Annotated[list[TokenLogprob], Meta(max_length=MAX_TOP_LOGPROBS)] = []


LogprobList = Annotated[list[Logprobs], Meta(max_length=MAX_ITEMS)]


def check_logprobs(msg: "Message", count: int) -> None:
    """For __post_init__: ``logprobs``, when given, has one entry per token."""
    if msg.logprobs is not None and len(msg.logprobs) != count:
        raise ProtocolError(f"{type(msg).__name__}: {len(msg.logprobs)} logprobs for {count} tokens: "
                            "expected one per token")


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


@message(4)
class DrainWorker(Message):
    """Drain the registered worker(s) named ``worker_id`` (``worker drain --worker-id``): the
    broker dispatches nothing more to them and tells them so (``Drain``); each finishes what it
    holds and leaves. Answered by a ``Pong`` with this nonce and ``stats`` ``{"worker_id",
    "draining": how many registered workers have that id}``."""
    worker_id: Name
    nonce: U64 = 0


@message(10)
class Accepted(Message):
    request_id: RequestId
    broker: RequestId = ""   # this broker's instance id (random per start; ``Pong.stats["instance"]``
                            # too): a client that meets another has met a restart that lost its requests


@message(11)
class Tokens(Message, omit_defaults=True):
    """Output tokens, in order; ``index`` is the position of the first one in the output.
    ``prompt_tokens``, on a request's first tokens only, counts its prompt (a client's per-chunk
    usage needs it before the Final); fields at their defaults stay off the wire."""
    request_id: RequestId
    index: U32
    token_ids: TokenList
    text: str = ""
    attempt: U32 = 0
    prompt_tokens: U32 = 0
    logprobs: Optional[LogprobList] = None     # one per token, when the sampling asked
    prompt_logprobs: Optional[LogprobList] = None   # with token 0, when the sampling asked

    def __post_init__(self) -> None:
        check_logprobs(self, len(self.token_ids))


@message(12)
class Final(Message):
    """The end of a request. It may carry the last output tokens (``token_ids`` from ``index``,
    as a ``Tokens`` message would): a request's last step then costs one message, not two."""
    request_id: RequestId
    finish_reason: Annotated[str, Meta(max_length=32)]
    usage: Map = field(default_factory=dict)     # prompt_tokens, completion_tokens
    timings: Map = field(default_factory=dict)   # seconds: queue, prefill, kv_transfer, ttft, total; kv_bytes
    index: U32 = 0
    token_ids: TokenList = field(default_factory=list)
    text: str = ""
    logprobs: Optional[LogprobList] = None
    prompt_logprobs: Optional[LogprobList] = None

    def __post_init__(self) -> None:
        check_logprobs(self, len(self.token_ids))


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
MAX_CHAT_MARKERS, MAX_MARKER_CHARS = 8, 64    # Ready.chat_markers at most
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
    # the special tokens the model's own chat template writes (none: it ships no template); the
    # gateway templates a Triton text_input holding none of them (client/triton.py)
    chat_markers: Annotated[list[Annotated[str, Meta(min_length=1, max_length=MAX_MARKER_CHARS)]],
                            Meta(max_length=MAX_CHAT_MARKERS)] = field(default_factory=list)
    # its KV block size: the broker computes a token prompt's block keys with it (0: unknown)
    tokens_per_block: Annotated[int, Meta(ge=0, le=MAX_TOKENS_PER_BLOCK)] = 0


@message(21)
class Heartbeat(Message):
    free_blocks: U32 = 0
    leases: U32 = 0
    max_decode_batch: U32 = 0     # largest decode batch since the previous heartbeat
    draining: bool = False        # the worker takes no new work: it finishes what it holds, then
                                  # leaves (SIGTERM); the broker answers with ``Drain``


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
    logprobs: Optional[LogprobList] = None   # the first token's, when the sampling asked
    prompt_logprobs: Optional[LogprobList] = None

    def __post_init__(self) -> None:
        token_fields(self, "prompt_token_ids")
        check_logprobs(self, 1)


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
    logprobs: Optional[LogprobList] = None
    prompt_logprobs: Optional[LogprobList] = None

    def __post_init__(self) -> None:
        check_logprobs(self, len(self.token_ids))


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


@message(37)
class Drain(Message):
    """The broker dispatches nothing more to this worker: sent after the last work it was given
    (the connection keeps order), in answer to a draining ``Heartbeat``, or on an operator's
    ``DrainWorker``. The worker finishes what it holds, sends ``Disconnect`` and exits."""
    reason: Text = ""
