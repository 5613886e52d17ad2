"""One request as the client sees it: building and validating the Submit, and the per-request
state machine that turns broker messages into chunks and one completion.

Shared by ``Client`` and ``AsyncClient``; this module does no I/O. Bad input is caught here so it
never leaves the process.
"""
from __future__ import annotations

import math
import operator
import random
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import msgspec

from broker.discovery import find_broker
from broker.protocol import (Accepted, Code, Error, Final, Message, ProtocolError,
                             SamplingParams, Submit, Tokens)

from .errors import BrokerUnavailable, ClientError, InvalidRequest, RequestFailed, failure


@dataclass
class Chunk:
    """A batch of output tokens; ``index`` is the position of its first token in the output.
    ``logprobs``: one ``broker.protocol.Logprobs`` per token when the request asked (``logprobs=K``);
    ``prompt_logprobs``: one per prompt token, on the first chunk, when it asked (``prompt_logprobs=K``;
    the first prompt token's says 0.0: nothing comes before it)."""
    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: Optional[list] = None
    prompt_logprobs: Optional[list] = None


@dataclass
class Completion:
    """A finished request. ``finish_reason`` is "stop", "length" or "cancelled"; ``usage`` has
    prompt_tokens and completion_tokens; ``timings`` has queue, prefill, kv_transfer, ttft, total
    (seconds) and kv_bytes (the KV cache moved between workers), as the broker reported them."""
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    logprobs: Optional[list] = None     # one ``Logprobs`` per token id, when the request asked
    prompt_logprobs: Optional[list] = None   # one per prompt token, when the request asked


def check_timeout(timeout: Any, default: float) -> float:
    """The call's timeout in seconds: ``timeout`` or the client's default, a finite number > 0."""
    t = default if timeout is None else timeout
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise InvalidRequest(Code.INVALID_REQUEST, f"invalid timeout={t!r}: expected a number of seconds > 0")
    return float(t)


def broker_address(address: str, cluster_name: str, timeout: float) -> str:
    """``address`` as given (``tcp://HOST:PORT``), or for ``etcd://HOST:PORT`` the frontend the
    broker of ``cluster_name`` publishes there (broker/discovery.py), waiting up to ``timeout``
    s; ``BrokerUnavailable`` when none is there, ``ClientError`` for a malformed URI."""
    try:
        return find_broker(address, cluster_name, "frontend", timeout)
    except LookupError as e:
        raise BrokerUnavailable(str(e)) from None
    except ValueError as e:
        raise ClientError(str(e)) from None


def build_submit(prompt: Optional[str] = None, *, token_ids: Any = None, messages: Any = None,
                 sampling: Optional[dict] = None, timeout: float,
                 request_id: Optional[str] = None, model: Optional[str] = None) -> tuple[Submit, list]:
    """Validate everything locally and return the ``Submit`` and its encoded frames.

    Raises ``InvalidRequest`` (code INVALID_REQUEST) naming the field and value.
    """
    rid = uuid.uuid4().hex if request_id is None else request_id
    if not isinstance(rid, str):
        raise InvalidRequest(Code.INVALID_REQUEST, f"invalid request_id={rid!r}: expected a string")
    try:
        given = dict(sampling or {})
        params = SamplingParams.from_dict(given)
        # send only what the caller set (normalized), so the server's defaults apply to the rest
        wire_sampling = {k: v for k, v in params.to_dict().items() if k in given}
        if token_ids is not None:
            token_ids = _token_list(token_ids)
        if messages is not None:
            messages = _message_list(messages)
        submit = Submit(request_id=rid, prompt=prompt, token_ids=token_ids, messages=messages,
                        sampling=wire_sampling, model=model,
                        timeout_ms=max(1, math.ceil(timeout * 1000)))
        frames = submit.encode()
    except ProtocolError as e:
        raise InvalidRequest(Code.INVALID_REQUEST, str(e), False, rid) from None
    except (TypeError, ValueError, OverflowError) as e:  # a value msgpack cannot carry
        raise InvalidRequest(Code.INVALID_REQUEST, f"request cannot be encoded: {e}", False, rid) from None
    return submit, frames


def prepare_submit(prompt, token_ids, messages, timeout, default_timeout: float, request_id,
                   sampling, in_flight, resume: bool = False,
                   model: Optional[str] = None) -> tuple[Submit, float, list]:
    """What both clients do before sending: check the timeout, validate, refuse a duplicate id.
    A request that may be resumed gets a seed of its own (unless it has one), so that a resumed
    run samples what the lost one would have.

    Returns the Submit, the call's timeout in seconds and the encoded frames.
    """
    timeout = check_timeout(timeout, default_timeout)
    if resume and sampling.get("seed") is None:
        sampling = dict(sampling, seed=random.getrandbits(63))
    submit, frames = build_submit(prompt, token_ids=token_ids, messages=messages, sampling=sampling,
                                  timeout=timeout, request_id=request_id, model=model)
    rid = submit.request_id
    if rid in in_flight:
        raise failure(Code.DUPLICATE_REQUEST, f"request id {rid!r} is already in flight on this client",
                      False, rid)
    return submit, timeout, frames


def _token_list(token_ids: Any) -> list[int]:
    if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__iter__"):
        raise ProtocolError(f"invalid token_ids={token_ids!r}: expected a list of token ids >= 0")
    out = []
    for i, t in enumerate(token_ids):
        try:
            v = operator.index(t)   # accepts numpy integers, refuses floats and bools' cousins
        except TypeError:
            v = None
        if v is None or isinstance(t, bool) or not 0 <= v < 2**32:
            raise ProtocolError(f"invalid token_ids[{i}]={t!r}: expected an integer in [0, 2**32)")
        out.append(v)
    return out


def _message_list(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ProtocolError(f"invalid messages={messages!r}: expected a list of "
                            "{'role': str, 'content': str}")
    return [dict(m) if isinstance(m, dict) else m for m in messages]


class RequestState:
    """What the client knows about one in-flight request.

    ``feed`` takes the broker's messages for this request in arrival order. Token batches are
    placed by ``index``: a batch already received is dropped, a gap (or a partial overlap, whose
    text cannot be split) fails the request with code PROTOCOL. ``finished`` turns true on Final or
    Error; a request left unfinished must be cancelled at the broker by the caller.
    """

    def __init__(self, request_id: str, submit: Optional[Submit] = None) -> None:
        self.request_id = request_id
        self.submit = submit        # kept only when the caller opted in to resuming
        self.resumes = 0
        self.heard = False          # any message from the broker for this request
        self.finished = False       # the broker sent its one final message
        self.failed = False         # finished, or given up on locally (protocol violation)
        self.token_ids: list[int] = []
        self.prompt_tokens = 0      # as the broker counted them, with the first tokens
        self._texts: list[str] = []
        self.logprobs: Optional[list] = None    # one per token id, once a message carried them
        self.prompt_logprobs: Optional[list] = None
        self.completion: Optional[Completion] = None

    @property
    def done(self) -> bool:
        return self.finished or self.failed

    def feed(self, msg: Message) -> Optional[Chunk]:
        """Apply one message; return the new chunk, if any. Raises ``RequestFailed`` on Error."""
        self.heard = True
        if self.done:
            return None
        if isinstance(msg, Tokens):
            return self._tokens(msg)
        if isinstance(msg, Final):
            chunk = self._tokens(msg) if msg.token_ids else None    # the last tokens may ride in it
            self.finished = True
            self.completion = Completion(self.request_id, "".join(self._texts), list(self.token_ids),
                                         msg.finish_reason, dict(msg.usage), dict(msg.timings),
                                         list(self.logprobs) if self.logprobs is not None else None,
                                         self.prompt_logprobs)
            return chunk
        if isinstance(msg, Error):
            if self.resumes and msg.code == Code.DUPLICATE_REQUEST:
                return None     # the broker never lost it (a slow spell, not a restart): carry on
            self.finished = True
            raise failure(msg.code, msg.message, msg.retryable, self.request_id)
        if not isinstance(msg, Accepted):
            self._violation(f"unexpected {type(msg).__name__} message")
        return None

    def _tokens(self, msg: Union[Tokens, Final]) -> Optional[Chunk]:
        expected = len(self.token_ids)
        end = msg.index + len(msg.token_ids)
        if msg.index < expected and end <= expected:
            return None     # a duplicate of tokens already delivered
        if msg.index != expected:
            what = "gap" if msg.index > expected else "partial overlap"
            self._violation(f"{what} in the token stream: got tokens [{msg.index}, {end}), "
                            f"expected index {expected}")
        if not msg.token_ids:
            return None
        if msg.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(msg.logprobs)
        if msg.prompt_logprobs is not None:
            self.prompt_logprobs = msg.prompt_logprobs
        if isinstance(msg, Tokens) and msg.prompt_tokens:
            self.prompt_tokens = msg.prompt_tokens
        self.token_ids.extend(msg.token_ids)
        self._texts.append(msg.text)
        return Chunk(self.request_id, msg.index, list(msg.token_ids), msg.text, msg.logprobs,
                     msg.prompt_logprobs)

    def resumable(self, error: ClientError) -> bool:
        """Whether to resume after ``error``: the caller opted in, the broker went silent (or a
        resume met a retryable refusal, e.g. no worker registered yet), and no protocol broke."""
        if self.submit is None or (self.failed and not self.finished):
            return False
        return isinstance(error, BrokerUnavailable) or (
            self.resumes > 0 and isinstance(error, RequestFailed) and error.retryable)

    def resume_frames(self, timeout: float) -> list:
        """The Submit that continues this request after the tokens received so far (the broker
        and the worker treat them as generated: max_tokens, stops and usage count them)."""
        self.finished = self.failed = False
        self.resumes += 1
        out = msgspec.structs.replace(self.submit, output_ids=list(self.token_ids) or None,
                                      output_chars=sum(map(len, self._texts)) if self.token_ids else None,
                                      timeout_ms=max(1, math.ceil(timeout * 1000)))
        return out.encode()

    def _violation(self, what: str) -> None:
        self.failed = True
        raise RequestFailed(Code.PROTOCOL, f"broker broke the protocol: {what}", False, self.request_id)


class StreamBase:
    """What ``Stream`` and ``AsyncStream`` share: the request's state, its deadline, and the
    completion (finish reason, usage, timings) once the stream has ended."""

    def __init__(self, client: Any, state: RequestState, deadline: float, timeout: float) -> None:
        self._client = client
        self._state = state
        self._deadline = deadline
        self._timeout = timeout
        self._closed = False

    @property
    def request_id(self) -> str:
        return self._state.request_id

    @property
    def completion(self) -> Optional[Completion]:
        return self._state.completion

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens, once the first tokens (or the end) have come; else 0."""
        c = self._state.completion
        return self._state.prompt_tokens or (int(c.usage.get("prompt_tokens") or 0) if c else 0)
