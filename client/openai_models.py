"""The OpenAI request and response bodies the HTTP gateway speaks, as pydantic models.

Requests are checked strictly (no coercion, unknown fields refused, NaN and infinities refused,
integers bounded), and the first error becomes one OpenAI-shaped ``HttpError`` whose ``param`` is
the field path pydantic reports (``messages[0].role``) and whose message shows the bad value.
Responses are built from models too, so their shape is written down in one place. Pure: no I/O;
of the project it imports only ``broker.config``, for the field path and the integer bound that
the configuration errors use too, and ``broker.protocol``'s bounds on bad words.
"""
from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_serializer)
from pydantic_core import PydanticCustomError
from typing_extensions import Annotated

from broker.config import MAX_INT, dotted     # token ids and counts fit a signed 32-bit integer
from broker.protocol import MAX_BAD_WORD_CHARS, MAX_BAD_WORDS


class HttpError(Exception):
    """An OpenAI-shaped error response: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type_: Optional[str] = None, retry_after: Optional[int] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.retry_after = retry_after

    def body(self) -> dict:
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                           code=self.code)).model_dump()


def shown(value: Any) -> str:
    """A request value as the user wrote it (JSON), cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse(code: str, message: str) -> PydanticCustomError:
    """A validator's error with our code (``unsupported_value``, ``missing_field``) and whole message."""
    return PydanticCustomError(code, "{message}", {"message": message})


# ---------------------------------------------------------------------------------------------
# requests

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
Count = Annotated[int, Field(ge=1, le=MAX_INT)]
TokenId = Annotated[int, Field(ge=0, le=MAX_INT)]

# fields that must be absent or hold their "off" value, because this engine cannot honour them
OFF_VALUES = {
    "suffix": ("",), "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],),
    "function_call": ("none", "auto"), "response_format": ({"type": "text"},),
}
CHAT_OFF_VALUES = {"echo": (False,)}      # completions honour echo; OpenAI's chat has none
MAX_N = 16                  # choices (n) and samples (best_of) per request
MAX_LOGPROBS = 20           # top_logprobs (chat) and logprobs (completions): OpenAI's bound
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
ChoiceCount = Annotated[int, Field(ge=1, le=MAX_N)]
_OFF_HINT: dict = {}
# request fields OpenAI clients send that change nothing here: accepted and ignored
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
           "safety_identifier")


_ALL_OFF = {**OFF_VALUES, **CHAT_OFF_VALUES}


def _off(v: Any, info: ValidationInfo) -> Any:
    if v is not None and not any(v == o and isinstance(v, bool) == isinstance(o, bool)
                                 for o in _ALL_OFF[info.field_name]):
        raise _refuse("unsupported_value", f"{info.field_name}={json.dumps(v)[:60]} is not supported by this "
                                           f"server{_OFF_HINT.get(info.field_name, '')}")
    return v


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False
    continuous_usage_stats: Optional[bool] = None


class _Request(BaseModel):
    """The fields completions and chat completions share."""
    model_config = _STRICT
    model: Optional[str] = None
    max_tokens: Optional[Count] = None
    temperature: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    top_p: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    top_k: Optional[Annotated[int, Field(ge=-1, le=MAX_INT)]] = None     # 0 or -1 turns it off
    min_p: Optional[Annotated[float, Field(ge=0, le=1)]] = None         # 0 turns it off
    seed: Optional[int] = None                                          # any integer: taken mod 2**63
    stop: Any = None
    stop_token_ids: Optional[list[TokenId]] = None
    n: Optional[ChoiceCount] = None                   # choices: parallel samples of one prompt
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    best_of: Optional[ChoiceCount] = None             # samples, of which the n likeliest are returned
    repetition_penalty: Optional[Annotated[float, Field(gt=0)]] = None  # 1 turns it off
    presence_penalty: Optional[Annotated[float, Field(ge=-2, le=2)]] = None
    frequency_penalty: Optional[Annotated[float, Field(ge=-2, le=2)]] = None
    min_tokens: Optional[Annotated[int, Field(ge=0, le=1 << 20)]] = None   # vLLM's extension
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100)]]] = None
    ignore_eos: Optional[bool] = None
    bad_words: Optional[Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_BAD_WORD_CHARS)]],
                                  Field(max_length=MAX_BAD_WORDS)]] = None   # vLLM's extension
    # accepted only "off" (see OFF_VALUES), and accepted and ignored (see IGNORED)
    suffix: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None

    _check_off = field_validator(*OFF_VALUES)(_off)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else v
        if v is not None and (not isinstance(stops, list) or len(stops) > 16
                              or not all(isinstance(x, str) and x for x in stops)):
            raise ValueError("expected a non-empty string or a list of at most 16 non-empty strings")
        return stops

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: Any, info: ValidationInfo) -> Any:
        n = info.data.get("n") or 1
        if v is not None and v < n:
            raise _refuse("invalid_value", f"best_of={v} must be at least n={n}")
        if v is not None and v > n and info.data.get("stream"):
            raise _refuse("unsupported_value", f"best_of={v} > n={n} cannot stream: the likeliest "
                                               "choices are known at the end only")
        return v

    @property
    def choices(self) -> tuple[int, int]:
        """(n, best_of): choices returned, samples run."""
        n = self.n or 1
        return n, self.best_of or n

    def logprobs_wanted(self) -> Optional[int]:
        """Alternatives per token the engine computes (``SamplingParams.logprobs``), or None."""
        return None

    def sampling(self, default_max_tokens: Optional[int]) -> dict:
        """The ``AsyncClient`` sampling arguments: only what was set, plus OpenAI's defaults."""
        s: dict = {}
        mt = self._max_tokens()
        if mt is not None:
            s["max_tokens"] = mt
        elif default_max_tokens is not None:
            s["default_max_tokens"] = default_max_tokens   # clipped to the context, never refused
        s["temperature"] = 1.0 if self.temperature is None else float(self.temperature)   # OpenAI's default
        if self.top_p is not None:
            s["top_p"] = float(self.top_p)
        if self.top_k is not None:
            s["top_k"] = max(0, self.top_k)
        if self.min_p is not None:
            s["min_p"] = float(self.min_p)
        if self.seed is not None:
            s["seed"] = self.seed % 2**63
        if self.repetition_penalty is not None:
            s["repetition_penalty"] = float(self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                s[name] = float(getattr(self, name))
        if self.min_tokens:
            s["min_tokens"] = self.min_tokens
        if self.logit_bias:
            s["logit_bias"] = [[key, float(bias)] for key, bias in self.logit_bias.items()]
        if self.stop:
            s["stop"] = self.stop
        if self.stop_token_ids is not None:
            s["stop_token_ids"] = self.stop_token_ids
        if self.ignore_eos is not None:
            s["ignore_eos"] = self.ignore_eos
        if self.bad_words:
            s["bad_words"] = self.bad_words
        if self.logprobs_wanted() is not None:
            s["logprobs"] = self.logprobs_wanted()
        return s

    def _max_tokens(self) -> Optional[int]:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk, as vLLM gives it (with include_usage only)."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


class CompletionRequest(_Request):
    prompt: Any = Field(None, validate_default=True)
    logprobs: Optional[LogprobCount] = None   # the sampled token's and this many alternatives'
    echo: Optional[bool] = None               # the prompt before the answer

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: Any, info: ValidationInfo) -> Any:
        if v and not isinstance(info.data.get("prompt"), str):
            raise _refuse("unsupported_value", "echo=true is supported with a text prompt only (the gateway "
                                               "has no tokenizer to write token ids as text)")
        return v

    def logprobs_wanted(self) -> Optional[int]:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, p: Any) -> Any:
        """A string, a list of token ids, or a one-element list of either."""
        if p is None:
            raise _refuse("missing_field", "missing required field 'prompt'")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str) and p:
            return p
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            for t in p:
                if not 0 <= t <= MAX_INT:
                    raise _refuse("invalid_value", f"invalid prompt={shown(t)}: expected token ids in "
                                                   f"[0, {MAX_INT}]")
            return p
        if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
            raise _refuse("unsupported_value", f"prompt holds {len(p)} prompts; this server takes one "
                                               "prompt per request")
        raise ValueError("expected a non-empty string or a non-empty list of token ids")

    def inputs(self) -> dict:
        return {"prompt": self.prompt} if isinstance(self.prompt, str) else {"token_ids": self.prompt}


_EMPTY = (None, [], "")


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant", "developer"]   # tool messages are not supported
    content: Any = Field(None, validate_default=True)
    name: Optional[str] = None
    # what an OpenAI client may echo back in an assistant message: accepted only empty
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None
    annotations: Any = None

    @field_validator("tool_calls", "tool_call_id", "function_call", "refusal", "audio", "annotations")
    @classmethod
    def _empty(cls, v: Any, info: ValidationInfo) -> Any:
        if v not in _EMPTY:
            raise _refuse("unsupported_value", f"{info.field_name} in a message is not supported by this server")
        return v

    @field_validator("content")
    @classmethod
    def _content(cls, content: Any, info: ValidationInfo) -> str:
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f'part {j} is not a text part {{"type": "text", "text": "..."}} '
                                     "(only text is supported)")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and info.data.get("role") == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ValueError("expected a string or a list of text parts")
        return content

    def plain(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatCompletionRequest(_Request):
    messages: Optional[Annotated[list[ChatMessage], Field(min_length=1)]] = Field(None, validate_default=True)
    max_completion_tokens: Optional[Count] = None
    logprobs: Optional[bool] = None             # each output token's log-probability
    top_logprobs: Optional[LogprobCount] = None   # and this many alternatives' (with logprobs)
    echo: Any = None

    _check_chat_off = field_validator(*CHAT_OFF_VALUES)(_off)

    @field_validator("top_logprobs")
    @classmethod
    def _top(cls, v: Any, info: ValidationInfo) -> Any:
        if v and not info.data.get("logprobs"):
            raise _refuse("invalid_value", f"top_logprobs={v} needs logprobs=true")
        return v

    def logprobs_wanted(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("messages", mode="before")
    @classmethod
    def _present(cls, v: Any) -> Any:
        if v is None:
            raise _refuse("missing_field", "missing required field 'messages'")
        return v

    def _max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def inputs(self) -> dict:
        return {"messages": [m.plain() for m in self.messages]}


def parse_request(schema: type, body: dict) -> Any:
    """``body`` as ``schema``, or the ``HttpError`` (400) for its first problem."""
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
    param, kind = dotted(err["loc"]), err["type"]
    if kind == "extra_forbidden":
        supported = sorted(k for k in schema.model_fields if k not in IGNORED)
        hint = f"; supported: {', '.join(supported)}" if len(err["loc"]) == 1 else ""
        raise HttpError(400, f"unknown field {param!r}{hint}", param, "unknown_field")
    if kind in ("unsupported_value", "missing_field", "invalid_value"):
        msg, leaf = err["msg"], str(err["loc"][-1]) if err["loc"] else ""
        if leaf and msg.startswith(leaf):     # our validators start with their field's name: give its path
            msg = param + msg[len(leaf):]
        raise HttpError(400, msg, param, kind)
    msg = {"value_error": lambda: str(err["ctx"]["error"]),
           "model_type": lambda: "expected a JSON object"}.get(kind, lambda: err["msg"])()
    if kind == "missing":
        raise HttpError(400, f"missing required field {param!r}", param, "missing_field")
    raise HttpError(400, f"invalid {param}={shown(err['input'])}: {msg}", param, "invalid_value")


# ---------------------------------------------------------------------------------------------
# responses

class _Out(BaseModel):
    """A response body; the keys in ``_omit_if_none`` are left out rather than sent as null."""
    _omit_if_none: ClassVar[tuple] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler) -> dict:
        d = handler(self)
        for k in self._omit_if_none:
            if d.get(k) is None:
                d.pop(k, None)
        return d


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(_Out):
    _omit_if_none = ("prompt_tokens_details",)
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None

    @classmethod
    def of(cls, u: dict) -> "Usage":
        """A finished request's usage (``cached_tokens`` in ``prompt_tokens_details``)."""
        details = PromptTokensDetails(cached_tokens=int(u.get("cached_tokens") or 0))
        return cls.running(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0), details)

    @classmethod
    def running(cls, prompt: int, completion: int, details: Optional[PromptTokensDetails] = None) -> "Usage":
        """The usage so far of a streaming request: no ``prompt_tokens_details`` (the cached part
        of the prompt is known only when it ends)."""
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=details)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Delta(_Out):
    """A chat chunk's delta: the role on the first chunk only, no content on an empty one."""
    _omit_if_none = ("role", "content")
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class TopLogprob(BaseModel):
    """A token of a chat choice's ``logprobs.content``: its text, log-probability and UTF-8 bytes."""
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """A completion choice's ``logprobs``: per token, its text, log-probability, the likeliest
    tokens with theirs (and the sampled one), and where it starts in the choice's text. A prompt
    token (echo) has a null log-probability."""
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: list[Optional[dict[str, float]]] = []
    text_offset: list[int] = []


class Choice(_Out):
    """One choice of a completion (``text``), a chat completion (``message``) or a chunk (``delta``)."""
    _omit_if_none = ("text", "message", "delta")
    index: int = 0
    text: Optional[str] = None
    message: Optional[AssistantMessage] = None
    delta: Optional[Delta] = None
    logprobs: Optional[Union[ChatLogprobs, CompletionLogprobs]] = None
    finish_reason: Optional[str] = None


class Completion(_Out):
    """A (chat) completion, or one streamed chunk of it (a chunk has no usage but the last)."""
    _omit_if_none = ("usage",)
    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: Optional[Usage] = None

    def sse(self) -> bytes:
        """This body as one server-sent event."""
        return b"data: " + self.model_dump_json().encode() + b"\n\n"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "disagg-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
