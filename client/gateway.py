"""The OpenAI-compatible HTTP gateway: aiohttp in front of the broker, through ``AsyncClient``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events with
``stream: true``), ``GET /v1/models``, ``GET /health`` (200 only while the configured minimum of
context and generation workers is registered), ``GET /metrics`` (the broker's Prometheus text).

Every error is OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: 400 names the
bad field and value, 404 an unknown model or route, 413 an oversized body, 503 (with
``Retry-After``) an overloaded broker or no worker up. A client that disconnects cancels its request
at the broker. Like the rest of client/, this module imports only ``broker.protocol`` from the
project: never torch, workers/ or transfer/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import threading
import time
import uuid
from typing import Any, Optional

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from broker.protocol import Code

from .aio import AsyncClient
from .errors import BrokerUnavailable, ClientError, RequestFailed, RequestTimeout

log = logging.getLogger("gateway")

DEFAULT_MAX_BODY = 4 * 1024 * 1024
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# request fields OpenAI clients send that change nothing here: accepted and ignored
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
            "safety_identifier"}
# fields that must be absent or hold their "off" value, because this engine cannot honour them
_OFF_VALUES = {
    "presence_penalty": (0,), "frequency_penalty": (0,), "logprobs": (False,),
    "top_logprobs": (0,), "echo": (False,), "suffix": ("",), "best_of": (1,), "logit_bias": ({},),
    "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
}
_OFF_HINT = {"presence_penalty": "; use repetition_penalty (an extension field) instead",
             "frequency_penalty": "; use repetition_penalty (an extension field) instead"}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "n",
           "stream", "stream_options", "repetition_penalty", "ignore_eos"}
_COMPLETION_FIELDS = _COMMON | {"prompt"} | _IGNORED | set(_OFF_VALUES)
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"} | _IGNORED | set(_OFF_VALUES)
_ROLES = {"system", "user", "assistant", "developer"}


class HttpError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type_: Optional[str] = None, retry_after: Optional[int] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return web.json_response(self.body(), status=self.status, headers=headers)


def bad(param: str, value: Any, expected: str) -> HttpError:
    shown = json.dumps(value) if _jsonable(value) else repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return HttpError(400, f"invalid {param}={shown}: expected {expected}", param, "invalid_value")


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def failure_to_http(e: ClientError) -> HttpError:
    """A client-library error (the broker's code, or a local one) as an HTTP error."""
    if isinstance(e, RequestTimeout):
        return HttpError(504, str(e), code="timeout", type_="timeout_error")
    if isinstance(e, BrokerUnavailable):
        return HttpError(503, f"the broker is not answering: {e}", code="broker_unavailable",
                         type_="service_unavailable_error", retry_after=2)
    if isinstance(e, RequestFailed):
        if e.code == Code.INVALID_REQUEST:
            return HttpError(400, e.message, _param_in(e.message), "invalid_value")
        if e.code in (Code.OVERLOADED, Code.NO_WORKERS):
            return HttpError(503, e.message, code=e.code.lower(), type_="service_unavailable_error",
                             retry_after=1)
        if e.code == Code.TIMEOUT:
            return HttpError(504, e.message, code="timeout", type_="timeout_error")
        return HttpError(500, e.message, code=e.code.lower(), retry_after=1 if e.retryable else None)
    return HttpError(500, str(e), code="internal")


def _param_in(message: str) -> Optional[str]:
    """The field a broker or worker INVALID_REQUEST message names, when it names one."""
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "stop",
                 "stop_token_ids", "ignore_eos", "token_ids", "prompt", "messages", "max_seq_len"):
        if name in message:
            return "prompt" if name in ("token_ids", "max_seq_len") else name
    return None


# ---------------------------------------------------------------------------------------------
# request parsing: OpenAI JSON -> AsyncClient arguments (pure)

def parse_common(body: dict, allowed: set, default_max_tokens: Optional[int]) -> tuple[dict, dict]:
    """Validate the sampling fields; returns (sampling kwargs, options: stream, include_usage)."""
    for k in body:
        if k not in allowed:
            raise HttpError(400, f"unknown field {k!r}; supported: {', '.join(sorted(allowed - _IGNORED))}",
                            k, "unknown_field")
    for k, off in _OFF_VALUES.items():
        v = body.get(k)
        if v is not None and not any(v == o and isinstance(v, bool) == isinstance(o, bool) for o in off):
            raise HttpError(400, f"{k}={json.dumps(v)[:60]} is not supported by this server{_OFF_HINT.get(k, '')}",
                            k, "unsupported_value")
    s: dict = {}
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    mt = body.get(name)
    if mt is not None:
        if not _is_int(mt) or not 1 <= mt < 2**31:
            raise bad(name, mt, "an integer >= 1")
        s["max_tokens"] = mt
    elif default_max_tokens is not None:
        s["max_tokens"] = default_max_tokens
    t = body.get("temperature")
    if t is not None:
        if not _is_num(t) or not 0 <= t <= 2:
            raise bad("temperature", t, "a number in [0, 2]")
        s["temperature"] = float(t)
    else:
        s["temperature"] = 1.0          # OpenAI's default
    v = body.get("top_p")
    if v is not None:
        if not _is_num(v) or not 0 < v <= 1:
            raise bad("top_p", v, "a number in (0, 1]")
        s["top_p"] = float(v)
    v = body.get("top_k")
    if v is not None:
        if not _is_int(v) or v < -1:
            raise bad("top_k", v, "an integer >= 0 (0 or -1 turns it off)")
        s["top_k"] = max(0, v)
    v = body.get("seed")
    if v is not None:
        if not _is_int(v):
            raise bad("seed", v, "an integer")
        s["seed"] = v % 2**63
    v = body.get("repetition_penalty")
    if v is not None:
        if not _is_num(v) or v <= 0:
            raise bad("repetition_penalty", v, "a number > 0 (1 turns it off)")
        s["repetition_penalty"] = float(v)
    v = body.get("stop")
    if v is not None:
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops) or len(stops) > 16:
            raise bad("stop", v, "a non-empty string or a list of at most 16 non-empty strings")
        if stops:
            s["stop"] = stops
    v = body.get("stop_token_ids")
    if v is not None:
        if not isinstance(v, list) or not all(_is_int(x) and x >= 0 for x in v):
            raise bad("stop_token_ids", v, "a list of token ids >= 0")
        s["stop_token_ids"] = v
    v = body.get("ignore_eos")
    if v is not None:
        if not isinstance(v, bool):
            raise bad("ignore_eos", v, "true or false")
        s["ignore_eos"] = v
    n = body.get("n")
    if n is not None and n != 1:
        raise bad("n", n, "1 (one choice per request is supported)") if not (_is_int(n) and n > 1) else \
            HttpError(400, f"n={n} is not supported: this server returns one choice per request", "n",
                      "unsupported_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", stream, "true or false")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict) or any(k not in ("include_usage", "continuous_usage_stats") for k in so):
            raise bad("stream_options", so, 'a map like {"include_usage": true}')
        include_usage = so.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad("stream_options.include_usage", include_usage, "true or false")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", model, "a model name (string)")
    return s, {"stream": stream, "include_usage": include_usage, "model": model}


def parse_prompt(body: dict) -> dict:
    """``prompt``: a string, a list of token ids, or a one-element list of either."""
    if "prompt" not in body or body["prompt"] is None:
        raise HttpError(400, "missing required field 'prompt'", "prompt", "missing_field")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise bad("prompt", p, "a non-empty string or a non-empty list of token ids")
        return {"prompt": p}
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        bad_ids = [t for t in p if t < 0]
        if bad_ids:
            raise bad("prompt", bad_ids[0], "token ids >= 0")
        return {"token_ids": p}
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise HttpError(400, f"prompt holds {len(p)} prompts; this server takes one prompt per request",
                        "prompt", "unsupported_value")
    raise bad("prompt", p, "a non-empty string or a non-empty list of token ids")


def parse_messages(body: dict) -> dict:
    msgs = body.get("messages")
    if msgs is None:
        raise HttpError(400, "missing required field 'messages'", "messages", "missing_field")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", msgs, "a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, m, "a map with role and content")
        role = m.get("role")
        if role not in _ROLES:
            raise bad(f"{where}.role", role, f"one of {', '.join(sorted(_ROLES))} (tool messages are not supported)")
        for k in m:
            if k not in ("role", "content", "name") and m[k] not in (None, [], ""):
                raise HttpError(400, f"{where}.{k} is not supported by this server", f"{where}.{k}",
                                "unsupported_value")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}]", part, 'a text part {"type": "text", "text": "..."} '
                                                            "(only text is supported)")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad(f"{where}.content", content, "a string or a list of text parts")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return {"messages": out}


# ---------------------------------------------------------------------------------------------
# the server

class Gateway:
    """The aiohttp application and its one ``AsyncClient`` connection to the broker."""

    def __init__(self, broker: str, *, host: str = "127.0.0.1", port: int = 8000,
                 models: tuple = (), min_workers: Optional[dict] = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY, request_timeout: float = 600.0,
                 chat_max_tokens: int = 256):
        self.broker, self.host, self.port = broker, host, port
        self.models = [m for m in models if m]
        self.known_models = set(self.models)
        self.min_workers = dict(min_workers if min_workers is not None else {"context": 1, "generation": 1})
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.chat_max_tokens = chat_max_tokens
        self.client: Optional[AsyncClient] = None
        self.runner: Optional[web.AppRunner] = None
        self.created = int(time.time())

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def start(self) -> None:
        """Bind (port 0 picks a free port; ``self.port`` then holds the chosen one)."""
        self.client = AsyncClient(self.broker, timeout=self.request_timeout)
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self.close()
            raise OSError(f"cannot bind the HTTP gateway to {self.host}:{self.port}: {e.strerror or e}") from None
        self.port = self.runner.addresses[0][1]
        log.info("OpenAI-compatible gateway on %s (broker %s)", self.url, self.broker)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.client is not None:
            await self.client.close()
            self.client = None

    # -- middleware -----------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as e:
            return e.response()
        except web.HTTPException as e:   # aiohttp's own: unknown route, wrong method, too large
            if e.status == 413:
                return HttpError(413, f"request body is larger than the limit of {self.max_body_bytes} bytes",
                                 None, "request_too_large").response()
            if e.status == 404:
                return HttpError(404, f"no route {request.path}; routes: /v1/completions, "
                                      "/v1/chat/completions, /v1/models, /health, /metrics",
                                 None, "not_found").response()
            if e.status == 405:
                return HttpError(405, f"method {request.method} is not allowed on {request.path}",
                                 None, "method_not_allowed").response()
            return HttpError(e.status, e.text or e.reason, None, None).response()

    # -- helpers ----------------------------------------------------------------------------------

    async def _json(self, request: web.Request) -> dict:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise HttpError(413, f"request body of {request.content_length} bytes is larger than the "
                                 f"limit of {self.max_body_bytes} bytes", None, "request_too_large")
        raw = await request.read()      # raises HTTPRequestEntityTooLarge past client_max_size
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise HttpError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                            None, "invalid_json")
        return body

    async def _stats(self, metrics: bool = False) -> dict:
        try:
            return await self.client.ping(timeout=3.0, metrics=metrics)
        except ClientError as e:
            raise HttpError(503, f"the broker is not answering: {e}", None, "broker_unavailable",
                            "service_unavailable_error", retry_after=2) from None

    async def _model(self, name: Optional[str]) -> str:
        if name is None:
            return self.models[0] if self.models else "default"
        if name in self.known_models:
            return name
        stats = await self._stats()
        self.known_models.update(w.get("model") for w in stats.get("workers", []) if w.get("model"))
        if name not in self.known_models:
            raise HttpError(404, f"the model {name!r} does not exist here; available: "
                                 f"{', '.join(sorted(self.known_models)) or 'none yet (no worker registered)'}",
                            "model", "model_not_found")
        return name

    # -- routes -----------------------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        stats = await self._stats()
        names = list(self.models)
        for w in stats.get("workers", []):
            if w.get("model") and w["model"] not in names:
                names.append(w["model"])
        self.known_models.update(names)
        return web.json_response({"object": "list", "data": [
            {"id": n, "object": "model", "created": self.created, "owned_by": "disagg-serve"} for n in names]})

    async def health(self, request: web.Request) -> web.Response:
        try:
            stats = await self._stats()
        except HttpError as e:
            return web.json_response({"status": "unavailable", "reason": e.message}, status=503,
                                     headers={"Retry-After": "2"})
        up = {"context": 0, "generation": 0, "both": 0}
        for w in stats.get("workers", []):
            up[w["role"]] = up.get(w["role"], 0) + 1
        # a `both` worker runs either phase, so it counts toward both minimums
        have = {r: up.get(r, 0) + up["both"] for r in ("context", "generation")}
        short = {r: (have[r], n) for r, n in self.min_workers.items() if have.get(r, 0) < n}
        body = {"status": "ok" if not short else "unavailable", "workers": up,
                "minimum": self.min_workers, "queued": stats.get("queued", 0)}
        if short:
            body["reason"] = "; ".join(f"{r} workers up {h}, need {n}" for r, (h, n) in short.items())
            return web.json_response(body, status=503, headers={"Retry-After": "2"})
        return web.json_response(body)

    async def metrics(self, request: web.Request) -> web.Response:
        stats = await self._stats(metrics=True)
        # the exposition version in the content type tells a scraper which text format this is
        return web.Response(body=stats.get("prometheus", "").encode(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST, "X-Content-Type-Options": "nosniff"})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        sampling, opts = parse_common(body, _COMPLETION_FIELDS, 16)
        inputs = parse_prompt(body)
        model = await self._model(opts["model"])
        return await self._serve(request, "cmpl", "text_completion", model, inputs, sampling, opts, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        sampling, opts = parse_common(body, _CHAT_FIELDS, self.chat_max_tokens)
        inputs = parse_messages(body)
        model = await self._model(opts["model"])
        return await self._serve(request, "chatcmpl", "chat.completion", model, inputs, sampling, opts, chat=True)

    async def _serve(self, request, prefix, obj, model, inputs, sampling, opts, chat) -> web.StreamResponse:
        rid = f"{prefix}-{uuid.uuid4().hex}"
        created = int(time.time())
        try:
            if not opts["stream"]:
                c = await self.client.generate(**inputs, request_id=rid, timeout=self.request_timeout, **sampling)
                choice = {"index": 0, "logprobs": None, "finish_reason": c.finish_reason}
                if chat:
                    choice["message"] = {"role": "assistant", "content": c.text}
                else:
                    choice["text"] = c.text
                return web.json_response({"id": rid, "object": obj, "created": created, "model": model,
                                          "choices": [choice], "usage": _usage(c.usage)})
            stream = self.client.stream(**inputs, request_id=rid, timeout=self.request_timeout, **sampling)
        except ClientError as e:
            raise failure_to_http(e) from None
        async with stream:
            try:   # wait for the first token before committing to a 200: early errors get a status
                first = await stream.__anext__()
            except StopAsyncIteration:
                first = None
            except ClientError as e:
                raise failure_to_http(e) from None
            resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
            await resp.prepare(request)
            chunk_obj = obj + ".chunk" if chat else obj

            def event(choice: dict, **extra) -> bytes:
                d = {"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": [choice]}
                d.update(extra)
                return b"data: " + json.dumps(d, ensure_ascii=False).encode() + b"\n\n"

            def delta(text: str, finish: Optional[str] = None, first_chunk: bool = False) -> bytes:
                if chat:
                    d = {"role": "assistant", "content": text} if first_chunk else ({"content": text} if text else {})
                    return event({"index": 0, "delta": d, "logprobs": None, "finish_reason": finish})
                return event({"index": 0, "text": text, "logprobs": None, "finish_reason": finish})

            try:
                await resp.write(delta(first.text if first else "", first_chunk=True))
                try:
                    async for ch in stream:
                        if ch.text:
                            await resp.write(delta(ch.text))
                except ClientError as e:
                    await resp.write(b"data: " + json.dumps(failure_to_http(e).body()).encode() + b"\n\n")
                    await resp.write(b"data: [DONE]\n\n")
                    return resp
                c = stream.completion
                await resp.write(delta("", c.finish_reason if c else "stop"))
                if opts["include_usage"] and c is not None:
                    d = {"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": [],
                         "usage": _usage(c.usage)}
                    await resp.write(b"data: " + json.dumps(d).encode() + b"\n\n")
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
            except (ConnectionError, RuntimeError) as e:   # the client went away: `async with` cancels
                log.info("client of %s disconnected mid-stream (%s); cancelling it", rid, type(e).__name__)
            return resp


def _usage(u: dict) -> dict:
    p, c = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# ---------------------------------------------------------------------------------------------
# running it beside a broker (in a thread with its own event loop) or on its own

class GatewayThread:
    """Runs a ``Gateway`` on its own event loop in a daemon thread (beside the broker's loop)."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="http-gateway", daemon=True)

    def start(self, timeout: float = 30.0) -> str:
        """Start and wait until bound; returns the URL. Raises the bind error, if any."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the HTTP gateway did not start within {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self.gateway.url

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            self._stop = asyncio.Event()
            try:
                loop.run_until_complete(self.gateway.start())
            except BaseException as e:
                self._error = e
                return
            finally:
                self._ready.set()
            loop.run_until_complete(self._stop.wait())
            loop.run_until_complete(self.gateway.close())
        finally:
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:   # the loop already closed
                pass
        self._thread.join(timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client.gateway",
                                 description="Run the OpenAI-compatible HTTP gateway against a running broker.")
    ap.add_argument("--broker", required=True, metavar="tcp://HOST:PORT", help="the broker's frontend address")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    ap.add_argument("--model", action="append", default=[], help="model name to serve (repeatable; "
                    "the models of registered workers are served too)")
    ap.add_argument("--min-context", type=int, default=1, help="context workers /health needs (default: 1)")
    ap.add_argument("--min-generation", type=int, default=1, help="generation workers /health needs (default: 1)")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gw = Gateway(args.broker, host=args.host, port=args.port, models=tuple(args.model),
                 min_workers={"context": args.min_context, "generation": args.min_generation})

    async def run() -> None:
        await gw.start()
        print(f"gateway ready http={gw.url} broker={args.broker}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await gw.close()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"gateway: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
