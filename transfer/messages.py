"""The KV transfer control channel's wire format: every message its two ends exchange.

Owns the typed messages (msgspec Structs), their bounds, and their framing on ZeroMQ:
``[MAGIC, msgpack]`` per message; a ``Chunk`` header is followed by one more frame, the raw KV
bytes it announces. A peer's input is never trusted: the typed decoders reject a wrong type, an
unknown tag, a number out of range, an oversized string, blob or list before any field is used
(the structs are flat, so nothing nests deeper than a list of triples); the receivers then check
what only they know (block ranges, transfer ids). Never pickle; this module does no I/O.

Generation side (sink) to context side (source); every request carries a ``seq`` that its
answer repeats, so that a late answer to an abandoned request is recognised and dropped:
  Hello(seq, info)           once per peer, answered by Welcome: the data planes swap what they
                             need to connect (NIXL agent metadata, UCX worker addresses, an MPI
                             port, a shared-memory fd)
  Start(seq, tid)            the transfer begins: starts the source's kv_transfer_timeout_ms;
                             answered by Ack
  Round(seq, tid, frames)    push planes (ZMQ, UCX, MPI): send these ``(offset, nbytes, tag)``
                             byte ranges of the pool; answered only by Refused
  Done(seq, tid)             every byte arrived; answered by Ack only while the source still
                             holds the transfer, so bytes read one-sidedly after an expiry or a
                             release are never accepted
Context side to generation side:
  Welcome(seq, info), Ack(seq), Refused(seq, error)
  Chunk(tag, nbytes) + bytes the ZMQ data plane's frames, on the control channel's socket
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct

from .base import MAX_ID_CHARS

MAGIC = b"KVC2"
MAX_MESSAGE_BYTES = 16 << 20     # any one frame on the channel, KV bytes included (ZeroMQ's
                                 # MAXMSGSIZE: a larger one drops the peer's connection)
MAX_FRAMES = 1 << 16             # byte ranges per Round (a sink sends more in several Rounds)
MAX_BLOB_BYTES = 1 << 20         # NIXL agent metadata, UCX worker addresses
MAX_ERROR_CHARS = 4096

Seq = Annotated[int, Meta(ge=0, le=2**63 - 1)]
TransferId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
Offset = Annotated[int, Meta(ge=0, le=2**62)]
Nbytes = Annotated[int, Meta(ge=1, le=2**40)]
Tag = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Blob = Annotated[bytes, Meta(max_length=MAX_BLOB_BYTES)]
Name = Annotated[str, Meta(max_length=1024)]
Count = Annotated[int, Meta(ge=0)]


class _Wire(Struct, frozen=True, array_like=True, tag=True):
    """Base of every message: a tagged msgpack array (the tag first), immutable once made."""


# ---------------------------------------------------------------------------------------------
# what the data planes swap in Hello and Welcome

class NoInfo(_Wire, tag="none"):
    """A plane that needs nothing from its peer (ZMQ; a sink of NIXL, SHM or MPI)."""


class NixlInfo(_Wire, tag="nixl"):
    metadata: Blob                          # the source agent's NIXL metadata
    addr: Count                             # the registered pool's address in the source
    nbytes: Count
    mem: Literal["DRAM", "VRAM"]
    dev: Annotated[int, Meta(ge=0, lt=1 << 16)]


class ShmInfo(_Wire, tag="shm"):
    pid: Annotated[int, Meta(ge=1, lt=1 << 31)]
    fd: Annotated[int, Meta(ge=0, lt=1 << 31)]
    nbytes: Count                           # of the shared file
    offset: Count                           # of the pool in that file
    host: Name                              # machine id and boot id: one host only


class UcxInfo(_Wire, tag="ucx"):
    address: Blob                           # a UCX worker address


class MpiInfo(_Wire, tag="mpi"):
    port: Name                              # from MPI_Open_port
    token: Annotated[str, Meta(max_length=64)]   # names the sink when it connects


Info = Union[NoInfo, NixlInfo, ShmInfo, UcxInfo, MpiInfo]


# ---------------------------------------------------------------------------------------------
# requests (sink to source) and answers (source to sink)

class _Numbered(_Wire):
    seq: Seq                                # a request's number; its answer repeats it


class Hello(_Numbered, tag="hello"):
    """Once per peer: what the sink's data plane offers; answered by Welcome."""
    info: Info


class Start(_Numbered, tag="start"):
    """The transfer begins (the source's clock starts); answered by Ack."""
    tid: TransferId


class Round(_Numbered, tag="round"):
    """Push planes: send these ``(offset, nbytes, tag)`` ranges; answered only by Refused."""
    tid: TransferId
    frames: Annotated[list[tuple[Offset, Nbytes, Tag]], Meta(max_length=MAX_FRAMES)]


class Done(_Numbered, tag="done"):
    """Every byte arrived; answered by Ack only while the source still holds the transfer."""
    tid: TransferId


class Welcome(_Numbered, tag="welcome"):
    """What the source's data plane offers to this sink."""
    info: Info


class Ack(_Numbered, tag="ack"):
    """The request is done."""


class Refused(_Numbered, tag="refused"):
    """The request failed (the transfer is gone, a range lies outside it...): says why."""
    error: Annotated[str, Meta(max_length=MAX_ERROR_CHARS)]


class Chunk(_Wire, tag="chunk"):
    """Header of one frame of KV bytes (ZMQ data plane): the Round frame it answers."""
    tag: Tag
    nbytes: Nbytes


Request = Union[Hello, Start, Round, Done]
Answer = Union[Welcome, Ack, Refused, Chunk]


class Malformed(ValueError):
    """Frames that are not a valid message of this protocol; the receiver drops them."""


_encoder = msgspec.msgpack.Encoder()
_requests = msgspec.msgpack.Decoder(Request)
_answers = msgspec.msgpack.Decoder(Answer)


def encode(msg: _Wire) -> list:
    """The frames of one message: ``[MAGIC, msgpack]``."""
    return [MAGIC, _encoder.encode(msg)]


def _decode(decoder: msgspec.msgpack.Decoder, body: bytes) -> _Wire:
    if len(body) > MAX_MESSAGE_BYTES:
        raise Malformed(f"a message of {len(body)} bytes (at most {MAX_MESSAGE_BYTES})")
    try:
        return decoder.decode(body)
    except msgspec.MsgspecError as exc:
        raise Malformed(str(exc)) from None
    except RecursionError:           # trailing elements nested too deeply to skip
        raise Malformed("a message nested too deeply") from None


def decode_request(frames: list) -> Request:
    """A request from its frames (the ROUTER's routing id already taken off)."""
    if len(frames) != 2 or frames[0] != MAGIC:
        raise Malformed(f"{len(frames)} frames, expected [{MAGIC!r}, body]")
    return _decode(_requests, frames[1])


def decode_answer(body: bytes) -> Answer:
    """An answer from its body frame (the receiver checked ``MAGIC`` in front of it)."""
    return _decode(_answers, body)
