"""How the protocol's messages become frames and back; package-private to ``broker/protocol.py``.

Read ``broker/protocol.py`` first: it holds every message and the wire format in words, and
re-exports what callers use from here (import from ``broker.protocol``, never from this module).
This module owns the framing (version tag, command byte, batches), the ``Message`` base class
(a frozen msgspec Struct with a typed decoder per command), the packed token ids, and the
translation of every decoding failure, deep nesting included, into ``ProtocolError``. It does no
I/O and never pickles.
"""
from __future__ import annotations

import operator
import re
import reprlib
import struct
import sys
from array import array
from collections.abc import Sequence as SequenceABC
from typing import Annotated, Any, ClassVar, Iterable, Iterator, Sequence, Union

import msgspec
from msgspec import Meta
from msgspec.structs import force_setattr

VERSION = b"DSRV3"      # DSRV3: msgspec maps, prompt token ids packed (TokenIds)
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
# bounds on what a peer may send (docs/architecture.md, "Bounded input")

MAX_MESSAGE_BYTES = 8 << 20   # ZMQ_MAXMSGSIZE default: twice the largest legitimate message (4 MiB
                              # of packed prompt ids, or a 4 MB prompt from the HTTP gateway)
MAX_DEPTH = 6                 # nesting of free-form values (sampling, messages, kv handles, stats)
MAX_ITEMS = 1 << 20           # elements of one array
MAX_KEYS = 256                # entries of one free-form map
MAX_ID_CHARS = 256            # request ids, worker ids
MAX_TEXT_CHARS = 1 << 16      # error messages, reasons


def _bounded_value(depth: int) -> Any:
    """A msgpack value nested at most ``depth`` arrays or maps deep, with bounded arrays and
    maps: what a free-form field decodes to. The typed decoder refuses anything deeper in C,
    before the value exists, so nothing downstream (a repr, an encode, a log line) recurses
    on a peer's nesting."""
    t: Any = Union[None, bool, int, float, str]
    for _ in range(depth):
        t = Union[None, bool, int, float, str, Annotated[list[t], Meta(max_length=MAX_ITEMS)],
                  Annotated[dict[str, t], Meta(max_length=MAX_KEYS)]]
    return t


Value = _bounded_value(MAX_DEPTH - 1)     # a map field's values (the map is one level)
Map = Annotated[dict[str, Value], Meta(max_length=MAX_KEYS)]
Maps = Annotated[list[Annotated[dict[str, _bounded_value(MAX_DEPTH - 2)], Meta(max_length=MAX_KEYS)]],
                 Meta(max_length=MAX_ITEMS)]
RequestId = Annotated[str, Meta(max_length=MAX_ID_CHARS)]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
Text = Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]
U32 = Annotated[int, Meta(ge=0, lt=1 << 32)]
U63 = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
U64 = Annotated[int, Meta(ge=0)]    # msgpack bounds it to 64 bits
TokenList = Annotated[list[U32], Meta(max_length=MAX_ITEMS)]


# ---------------------------------------------------------------------------------------------
# token ids: packed, so that a prompt crosses the broker as one bytes object

MAX_TOKEN_IDS = 1 << 20      # token ids in one field at most (4 MiB packed): far beyond any context
_TYPECODE = next(c for c in "IL" if array(c).itemsize == 4)    # an unsigned 32-bit array
_SWAP = sys.byteorder != "little"                             # the wire is little-endian


class TokenIds(SequenceABC):
    """Token ids as little-endian uint32s, packed in one bytes object (``packed``).

    A prompt's token ids cross the broker four times (Submit, Prefill, ContextDone, Decode); as
    a msgpack array of ints each crossing cost a decode, a check per id and an encode, so the
    broker's cost grew with the prompt. Packed, they pass through as one bytes object, checked only
    for a whole number of ids and a bound; the range check against the vocabulary is the
    worker's. It reads as a sequence of ints (``list()``, ``len()``, indexing, ``==`` a list)."""

    __slots__ = ("packed",)

    def __init__(self, ids: Iterable[int] = ()):
        if isinstance(ids, TokenIds):
            self.packed = ids.packed
            return
        if isinstance(ids, (str, bytes, bytearray, memoryview)):
            raise TypeError(f"TokenIds takes ints, got {type(ids).__name__} (packed bytes go to "
                            "TokenIds.from_packed)")
        a = array(_TYPECODE, ids)           # TypeError for a non-int, OverflowError outside uint32
        if _SWAP:
            a.byteswap()
        self.packed = a.tobytes()

    @classmethod
    def from_packed(cls, data: bytes) -> "TokenIds":
        """Token ids from their packed form; ValueError unless it is a whole number of ids, at
        most ``MAX_TOKEN_IDS``."""
        n = len(data)
        if n % 4 or n > 4 * MAX_TOKEN_IDS:
            raise ValueError(f"packed token ids of {n} bytes: expected a multiple of 4 bytes, "
                             f"at most {4 * MAX_TOKEN_IDS}")
        ids = cls.__new__(cls)
        ids.packed = bytes(data)
        return ids

    def _array(self) -> array:
        a = array(_TYPECODE)
        a.frombytes(self.packed)
        if _SWAP:
            a.byteswap()
        return a

    def tolist(self) -> list:
        return self._array().tolist()

    def __len__(self) -> int:
        return len(self.packed) >> 2

    def __iter__(self) -> Iterator[int]:
        return iter(self._array())

    def __getitem__(self, i):
        if isinstance(i, slice):
            return TokenIds(self._array()[i])
        n = len(self)
        i = operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"token index {i} out of range for {n} token ids")
        return struct.unpack_from("<I", self.packed, 4 * (i % n))[0]

    def __eq__(self, other: Any) -> bool:
        if type(other) is TokenIds:
            return self.packed == other.packed
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and self.tolist() == list(other)
        return NotImplemented

    __hash__ = None     # type: ignore[assignment]  # equal to lists, which have no hash

    def __repr__(self) -> str:
        ids = self._array()
        more = f", ... {len(ids)} ids" if len(ids) > 16 else ""
        return f"TokenIds({ids[:16].tolist()}{more})"


def _dec_hook(tp: type, value: Any) -> Any:
    # msgspec hands over what it cannot decode by itself: only TokenIds fields
    if tp is TokenIds:
        if type(value) is not bytes:
            raise ValueError(f"expected packed token ids (bytes), got {type(value).__name__}")
        return TokenIds.from_packed(value)
    raise NotImplementedError(f"no decoder for {tp!r}")


def _enc_hook(value: Any) -> Any:
    if type(value) is TokenIds:
        return value.packed
    raise TypeError(f"cannot encode {type(value).__name__} {value!r:.80}: not a plain value")


def token_fields(msg: "Message", *names: str) -> None:
    """For __post_init__: token ids given as a list (by the code that builds the message) become
    TokenIds; decoded ones already are."""
    for name in names:
        v = getattr(msg, name)
        if v is not None and type(v) is not TokenIds:
            try:
                force_setattr(msg, name, TokenIds(v))
            except (TypeError, OverflowError) as e:
                raise ProtocolError(f"{type(msg).__name__}.{name}: invalid token ids {_short(v)}: "
                                    f"expected integers in [0, 2**32) ({e})") from None


# ---------------------------------------------------------------------------------------------
# messages, and their encoding

_REGISTRY: dict[int, type["Message"]] = {}
_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_encode = _ENCODER.encode


class Message(msgspec.Struct, frozen=True, gc=False):
    """A wire message: a frozen msgspec Struct whose fields are its msgpack map, decoded by a
    typed decoder (missing fields, wrong types and bools for ints are refused in C). Messages
    hold only plain values, so the cycle collector need not track them (``gc=False``)."""
    CMD: ClassVar[int] = 0
    _head: ClassVar[bytes] = b""                       # VERSION + command byte
    _decoder: ClassVar[Any] = None                     # msgspec Decoder of this class

    def body(self) -> dict:
        """The map that goes on the wire, as plain values (token ids as their packed bytes)."""
        return msgspec.to_builtins(self, builtin_types=(bytes,), enc_hook=_enc_hook)

    def encode(self) -> list:
        """The message as the frames of one ZeroMQ message."""
        return [self._head + _encode(self)]


def message(cmd: int):
    """Class decorator: register a Message class under a one-byte command."""
    def wrap(cls):
        if cmd in _REGISTRY or cmd == BATCH:
            raise RuntimeError(f"command {cmd} is taken (by {_REGISTRY.get(cmd, 'batches')})")
        cls.CMD, cls._head = cmd, header(cmd)
        cls._decoder = msgspec.msgpack.Decoder(cls, dec_hook=_dec_hook)
        _REGISTRY[cmd] = cls
        return cls
    return wrap


_AT = re.compile(r"^(.*) - at `\$\.?([^`]*)`$", re.S)
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 120, 120
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = 8


def _short(value: Any) -> str:
    """A bounded repr for error messages: never recurses past a few levels, never copies a
    whole multi-megabyte string."""
    return _REPR.repr(value)


def _decode_body(cls: type[Message], data: Any) -> Message:
    """A msgpack body to a message of ``cls``; ProtocolError naming the request, the field and
    the value. A body nested too deeply to decode is a ProtocolError too (never RecursionError)."""
    cause = None
    try:
        return cls._decoder.decode(data)
    except msgspec.ValidationError as e:
        cause = e.__cause__ if isinstance(e.__cause__, ProtocolError) else None   # from __post_init__
        body = _plain(data)
        err = (ProtocolError(str(cause), cause.request_id) if cause is not None
               else ProtocolError(_field_error(cls, str(e), body)))
    except (ValueError, RecursionError) as e:   # msgspec.DecodeError, or a string not UTF-8
        body = None
        err = ProtocolError(f"undecodable body for {cls.__name__}: {e}")
    if err.request_id:
        pass
    elif isinstance(body, dict) and type(body.get("request_id")) is str:
        err.request_id = body["request_id"][:MAX_ID_CHARS]
    else:
        err.request_id = request_id_of(data)
    # raised from here, with no context: an exception kept in a frame it references is a
    # reference cycle, which the broker's rare cycle collection leaves in memory for long
    err.__suppress_context__ = True
    try:
        raise err
    finally:
        err = body = cause = None


def _plain(data: Any) -> Any:
    """The body as plain values, for error messages only (None if even that fails)."""
    try:
        return msgspec.msgpack.decode(data)
    except (ValueError, RecursionError):
        return None


def request_id_of(data: Any, budget: int = 10_000) -> str:
    """The ``request_id`` string of a msgpack map body that cannot be decoded (nested too deeply,
    truncated after the id...), read without recursion and within ``budget`` items; "" if
    there is none. So a bad message that names its request is answered with an error for it."""
    try:
        b = bytes(data)
        pos, n = _head(b, 0)
        if n[0] != "map":
            return ""
        for _ in range(n[1]):
            pos, k = _head(b, pos)
            is_rid = k[0] == "str" and b[k[1]:k[1] + k[2]] == b"request_id"
            if is_rid:
                pos2, v = _head(b, pos)
                if v[0] == "str" and v[2] <= MAX_ID_CHARS:
                    return b[v[1]:v[1] + v[2]].decode("utf-8")
                return ""
            pending = 1                  # the value after this key
            while pending:
                budget -= 1
                if budget < 0:
                    return ""
                pos, v = _head(b, pos)
                pending += -1 + (v[1] if v[0] == "array" else 2 * v[1] if v[0] == "map" else 0)
    except (IndexError, ValueError, struct.error):
        pass
    return ""


def _head(b: bytes, pos: int) -> tuple:
    """One msgpack item header at ``pos``: (position after it, (kind, count or start, length)).
    Containers report their element count; strings, binaries and extensions are skipped whole."""
    c = b[pos]
    if c <= 0x7f or c >= 0xe0 or c in (0xc0, 0xc2, 0xc3):
        return pos + 1, ("scalar", 0)
    if 0x80 <= c <= 0x8f:
        return pos + 1, ("map", c & 0x0f)
    if 0x90 <= c <= 0x9f:
        return pos + 1, ("array", c & 0x0f)
    if 0xa0 <= c <= 0xbf:
        return _blob(b, pos + 1, c & 0x1f, "str")
    fixed = {0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8, 0xd0: 1, 0xd1: 2, 0xd2: 4,
             0xd3: 8, 0xd4: 2, 0xd5: 3, 0xd6: 5, 0xd7: 9, 0xd8: 17}
    if c in fixed:
        if pos + 1 + fixed[c] > len(b):
            raise ValueError("truncated")
        return pos + 1 + fixed[c], ("scalar", 0)
    sized = {0xd9: (1, "str"), 0xda: (2, "str"), 0xdb: (4, "str"), 0xc4: (1, "bin"),
             0xc5: (2, "bin"), 0xc6: (4, "bin"), 0xc7: (1, "ext"), 0xc8: (2, "ext"),
             0xc9: (4, "ext"), 0xdc: (2, "array"), 0xdd: (4, "array"), 0xde: (2, "map"),
             0xdf: (4, "map")}
    if c not in sized:
        raise ValueError(f"no msgpack type 0x{c:02x}")
    width, kind = sized[c]
    n = int.from_bytes(b[pos + 1:pos + 1 + width], "big")
    pos += 1 + width
    if kind in ("array", "map"):
        return pos, (kind, n)
    return _blob(b, pos + (kind == "ext"), n, kind)


def _blob(b: bytes, start: int, n: int, kind: str) -> tuple:
    if start + n > len(b):
        raise ValueError("truncated")
    return start + n, (kind, start, n)


def _field_error(cls: type, text: str, body: Any) -> str:
    m = _AT.match(text)
    what, path = (m.group(1), m.group(2)) if m else (text, "")
    if body is None and path:      # too deep to read back: the decoder's words, with the path
        return f"{cls.__name__}.{path}: {what[:1].lower()}{what[1:]} (too deeply nested to show)"
    if not isinstance(body, dict):
        return f"body of {cls.__name__} is not a map"
    missing = re.match(r"Object missing required field `(\w+)`", what)
    if missing:
        return f"{cls.__name__}{'.' + path if path else ''}: missing field {missing.group(1)!r}"
    name = re.match(r"\w*", path).group(0)
    return f"{cls.__name__}.{path}: bad value {_short(body.get(name))} ({what[:1].lower()}{what[1:]})"


def _first(frames: Sequence) -> bytes:
    """The one frame of a message as bytes, checked for the version tag and a command byte."""
    if not frames:
        raise ProtocolError("empty message: expected a frame with the version, command and body")
    first = frames[0]
    if type(first) is not bytes:   # a zmq Frame (copy=False) or another buffer
        first = bytes(first.buffer) if hasattr(first, "buffer") else bytes(first)
    if first[:len(VERSION)] != VERSION:
        raise ProtocolError(f"wrong protocol version {first[:len(VERSION)]!r}, expected {VERSION!r}")
    if len(first) < HEADER_LEN:
        raise ProtocolError("message has no command byte after the version tag")
    if len(frames) != 1:      # no message has raw frames of its own
        what = "batch" if first[HEADER_LEN - 1] == BATCH else "message"
        raise ProtocolError(f"a {what} is one frame, got {len(frames)}")
    return first


def _decode(first: bytes) -> Message:
    cls = _REGISTRY.get(first[HEADER_LEN - 1])
    if cls is None:
        raise ProtocolError(f"unknown command {first[HEADER_LEN - 1]}")
    return _decode_body(cls, memoryview(first)[HEADER_LEN:])


def decode(frames: Sequence) -> Message:
    """The frames of one ZeroMQ message (without the ROUTER identity) to a message; raises
    ProtocolError."""
    return _decode(_first(frames))


def encode_many(msgs: Sequence[Message]) -> list:
    """Messages for one peer as the frames of one ZeroMQ message: a single message as itself,
    several as a batch."""
    if len(msgs) == 1:
        return msgs[0].encode()
    if not msgs:
        raise ValueError("encode_many needs at least one message")
    return [_BATCH_HEAD + _encode([(m.CMD, m) for m in msgs])]


BATCH_MAX = 512   # messages per batch at most: a receiver decodes a whole batch before serving it


def encode_batches(msgs: Sequence[Message]) -> Iterator[list]:
    """Messages for one peer as few ZeroMQ messages as ``BATCH_MAX`` allows, in order."""
    for i in range(0, len(msgs), BATCH_MAX):
        yield encode_many(msgs[i:i + BATCH_MAX])


_PAIRS = msgspec.msgpack.Decoder(list[tuple[int, msgspec.Raw]])   # a batch whose items are well formed
_ITEMS = msgspec.msgpack.Decoder(list[msgspec.Raw])
_PAIR = msgspec.msgpack.Decoder(tuple[int, msgspec.Raw])


def decode_all(frames: Sequence) -> list:
    """The frames of one ZeroMQ message (without the ROUTER identity) to the messages they carry,
    in order: the one message, or every message of a batch. Raises ProtocolError for a bad frame
    or envelope; a bad message inside a good batch becomes a ProtocolError *in its place*, so the
    others are still served (callers check ``isinstance(m, ProtocolError)``)."""
    first = _first(frames)
    if first[HEADER_LEN - 1] != BATCH:
        return [_decode(first)]
    data = memoryview(first)[HEADER_LEN:]
    try:
        pairs = _PAIRS.decode(data)
    except (msgspec.ValidationError, RecursionError):
        pairs = _pairs_one_by_one(data)
    except ValueError as e:
        raise ProtocolError(f"undecodable batch: {e}") from None
    out: list = []
    registry = _REGISTRY
    for i, pair in enumerate(pairs):
        if isinstance(pair, ProtocolError):
            out.append(pair)
            continue
        cmd, raw = pair
        cls = registry.get(cmd)
        try:
            if cls is None:
                raise ProtocolError(f"batch item {i}: unknown command {cmd!r}", request_id_of(raw))
            out.append(_decode_body(cls, raw))
        except ProtocolError as e:
            out.append(e.with_traceback(None))   # no cycle through this frame and ``out``
    return out


def _pairs_one_by_one(data: Any) -> list:
    """A batch with an item that is not a [command, map] pair, or one nested too deeply to skip:
    each item read on its own, a bad one becoming a ProtocolError (naming its request where it
    can) in its place."""
    try:
        items = _ITEMS.decode(data)
    except msgspec.ValidationError:
        raise ProtocolError("batch body is not an array") from None
    except (ValueError, RecursionError):
        items = _split_items(bytes(data))
    out: list = []
    for i, raw in enumerate(items):
        try:
            out.append(_PAIR.decode(raw))
        except (ValueError, RecursionError):
            out.append(ProtocolError(f"batch item {i} is not a [command, map] pair, or is nested "
                                     f"deeper than {MAX_DEPTH} levels", _pair_request_id(raw)))
    return out


def _split_items(b: bytes, budget: int = 10_000) -> list:
    """The items of a msgpack array as byte slices, found without recursion (for an array whose
    items msgspec cannot skip); ProtocolError if it is no array, is truncated, or holds more
    than ``budget`` headers in all."""
    try:
        pos, head = _head(b, 0)
        if head[0] != "array":
            raise ProtocolError("batch body is not an array")
        out = []
        for _ in range(head[1]):
            start, pending = pos, 1
            while pending:
                budget -= 1
                if budget < 0:
                    raise ProtocolError("undecodable batch: too many nested values")
                pos, v = _head(b, pos)
                pending += -1 + (v[1] if v[0] == "array" else 2 * v[1] if v[0] == "map" else 0)
            out.append(b[start:pos])
        return out
    except (IndexError, ValueError, struct.error) as e:
        raise ProtocolError(f"undecodable batch: {e}") from None


def _pair_request_id(raw: Any) -> str:
    """The request id in the map of a [command, map] batch item, read without recursion."""
    try:
        b = bytes(raw)
        pos, head = _head(b, 0)
        if head[0] != "array" or head[1] != 2:
            return ""
        pos, _ = _head(b, pos)
        return request_id_of(b[pos:])
    except (IndexError, ValueError, struct.error):
        return ""
