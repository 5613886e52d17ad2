"""The OpenAI-compatible HTTP gateway: aiohttp in front of the broker, through ``AsyncClient``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events with
``stream: true``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (200 only while the
configured minimum of context and generation workers is registered), ``GET /metrics`` (the
broker's Prometheus text), ``GET /perf_metrics`` (TensorRT-LLM's per-request timings, drained on
read: ``client/perf_metrics.py``), ``GET /version``. A request's id is its ``X-Request-Id``
(bounded, else a 400 naming the header) or a new one; every response carries it back, and a
completion's ``id`` is ``cmpl-ID`` / ``chatcmpl-ID``, as vLLM's.
A request's ``model`` picks the workers that run it: a name a worker announced goes to the broker
as it is; a configured name (``--model``) no worker announced, or none, runs on the broker's
default model.

Request and response bodies are the pydantic models of ``client/openai_models.py``. Every error
is OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: 400 names the bad field
(its path, in ``param``) and value, 404 an unknown model or route, 413 an oversized body, 503 (with
``Retry-After``) an overloaded broker, no worker up or a broker silent for its liveness window
(an open stream gets that error as its last event instead). A client that disconnects cancels
its request at the broker. With an API key set, every route but ``/health`` (and ``/metrics``
unless asked) needs ``Authorization: Bearer KEY``; 401 otherwise (docs/architecture.md §9).
Triton's ``/v2/health/*`` probes are open like ``/health``. From the project it
imports only ``broker.protocol``, ``broker.auth`` and, through its request models,
``broker.config``: never torch, workers/ or transfer/.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import json
import logging
import re
import sys
import threading
import time
import uuid
from typing import Optional

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from broker.auth import API_KEY_ENV, api_key_from, bearer_ok, curve_client, warn_exposed
from broker.config import ConfigError
from broker.protocol import Code

from .aio import AsyncClient
from .httpguard import GuardedRunner, read_body
from .errors import BrokerUnavailable, ClientError, RequestFailed, RequestTimeout
from .openai_models import (ChatCompletionRequest, CompletionRequest, HttpError, ModelCard, ModelList,
                            parse_request, shown)
from .perf_metrics import DEFAULT_MAX_REQUESTS, PerfMetrics
from .triton_metrics import render as trtllm_metrics

log = logging.getLogger("gateway")

try:
    VERSION = importlib.metadata.version("disagg-serve")
except importlib.metadata.PackageNotFoundError:    # run from a checkout that was never installed
    VERSION = "0+unknown"

DEFAULT_MAX_BODY = 4 * 1024 * 1024
DEFAULT_READ_TIMEOUT = 30.0        # seconds for a request's head, and for its body
DEFAULT_MAX_CONNECTIONS = 1024     # open HTTP connections; more are answered 503
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
TRITON_CHAT_TEMPLATE = ("auto", "on", "off")
REQUEST_ID_HEADER = "X-Request-Id"
# a request id a client may give (X-Request-Id): what tracing systems use (UUIDs, hex trace ids,
# ULIDs), bounded so that with its prefix it fits the broker's request ids and any log line
REQUEST_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")
# where the middleware leaves a request's id and arrival time (typed keys where aiohttp has them)
_KEY = getattr(web, "RequestKey", lambda name, _type: name)
RID, ARRIVAL, HELD = _KEY("request_id", str), _KEY("arrival", float), _KEY("broker_ids", list)


def error_response(e: HttpError) -> web.Response:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return web.json_response(e.body(), status=e.status, headers=headers)


def failure_to_http(e: ClientError, input_field: Optional[str] = None) -> HttpError:
    """A client-library error (the broker's code, or a local one) as an HTTP error. The gateway
    checked every field before sending, so what the broker or a worker can still call invalid is
    the request's input (``input_field``: its prompt or messages, e.g. a token outside the
    vocabulary or a prompt longer than the model's context)."""
    if isinstance(e, RequestTimeout):
        return HttpError(504, str(e), code="timeout", type_="timeout_error")
    if isinstance(e, BrokerUnavailable):
        return HttpError(503, f"the broker is not answering: {e}", code="broker_unavailable",
                         type_="service_unavailable_error", retry_after=2)
    if isinstance(e, RequestFailed):
        if e.code == Code.INVALID_REQUEST:
            return HttpError(400, e.message, input_field, "invalid_value")
        if e.code == Code.UNKNOWN_MODEL:      # its workers left since the gateway last looked
            return HttpError(404, e.message, "model", "model_not_found")
        if e.code in (Code.OVERLOADED, Code.NO_WORKERS):
            return HttpError(503, e.message, code=e.code.lower(), type_="service_unavailable_error",
                             retry_after=1)
        if e.code == Code.TIMEOUT:
            return HttpError(504, e.message, code="timeout", type_="timeout_error")
        return HttpError(500, e.message, code=e.code.lower(), retry_after=1 if e.retryable else None)
    return HttpError(500, str(e), code="internal")


def model_not_found(name: str, available: list) -> HttpError:
    return HttpError(404, f"the model {name!r} does not exist here; available: "
                          f"{', '.join(available) or 'none yet (no worker registered)'}", "model", "model_not_found")


async def first_chunk(stream, input_field: Optional[str] = None):
    """A stream's first chunk (None if it ended at once), awaited before a streamed response
    commits to its 200, so that an early error still gets its status (as an ``HttpError``)."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
    except ClientError as e:
        raise failure_to_http(e, input_field) from None


# ---------------------------------------------------------------------------------------------
# the server

class Gateway:
    """The aiohttp application and its one ``AsyncClient`` connection to the broker."""

    def __init__(self, broker: str, *, host: str = "127.0.0.1", port: int = 8000,
                 models: tuple = (), min_workers: Optional[dict] = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY, request_timeout: float = 600.0,
                 chat_max_tokens: int = 256, api_key: Optional[str] = None,
                 metrics_need_key: bool = False, curve=None, read_timeout: float = DEFAULT_READ_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, broker_liveness: float = 5.0,
                 triton_chat_template: str = "auto", perf_metrics_max_requests: int = DEFAULT_MAX_REQUESTS,
                 cluster_name: str = "default", discovery_timeout: float = 10.0):
        """``api_key``: every route but /health (and /metrics unless ``metrics_need_key``) needs
        ``Authorization: Bearer KEY``; ``curve``: the ``CurveClient`` for a CURVE broker;
        ``broker_liveness``: a silent broker fails calls (503) after this many seconds;
        ``triton_chat_template``: auto, on or off (client/triton.py); ``perf_metrics_max_requests``:
        the finished requests /perf_metrics keeps until read (client/perf_metrics.py).
        ``broker`` may be ``etcd://HOST:PORT``: the broker of ``cluster_name`` is found there
        (waiting up to ``discovery_timeout`` s), and followed when it moves."""
        self.broker, self.host, self.port = broker, host, port
        self.cluster_name, self.discovery_timeout = cluster_name, discovery_timeout
        self.api_key, self.curve = api_key, curve
        # health probes never need the key (Triton's too); /metrics only when asked
        self.open_paths = {"/health", "/v2/health/live", "/v2/health/ready",
                           *(() if metrics_need_key else ("/metrics",))}
        self.models = [m for m in models if m]
        self.known_models = set(self.models)
        self.worker_models: set = set()     # names workers announced: sent to the broker as they are
        self.chat_markers: dict = {}        # model -> the markers of its chat template (Ready.chat_markers)
        self.default_model: Optional[str] = None   # what a request naming no model runs on
        if triton_chat_template not in TRITON_CHAT_TEMPLATE:
            raise ValueError(f"invalid triton_chat_template={triton_chat_template!r}: expected one of "
                             f"{', '.join(TRITON_CHAT_TEMPLATE)}")
        self.triton_chat_template = triton_chat_template
        self.perf = PerfMetrics(perf_metrics_max_requests)
        self._served_at = -1e9               # time.monotonic() of the last look at the workers
        self.min_workers = dict(min_workers if min_workers is not None else {"context": 1, "generation": 1})
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.chat_max_tokens = chat_max_tokens
        self.read_timeout, self.max_connections = read_timeout, max_connections
        self.broker_liveness = broker_liveness
        self.client: Optional[AsyncClient] = None
        self._making: Optional[asyncio.Future] = None    # the client being made in a thread (etcd://)
        self._held: set = set()              # the broker ids of the requests in flight here (request_ids)
        self.runner: Optional[web.AppRunner] = None
        self.created = int(time.time())

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def app(self) -> web.Application:
        middlewares = [self._request_id, *([self._api_key] if self.api_key else []), self._errors]
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=middlewares)
        app.on_response_prepare.append(_echo_request_id)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model}", self.get_model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/perf_metrics", self.perf_metrics)
        app.router.add_get("/version", self.version)
        from .triton import TritonApi            # Triton's KServe v2 API, /v2/... (it imports this module)
        TritonApi(self).add_routes(app)
        return app

    async def start(self) -> None:
        """Bind (port 0 picks a free port; ``self.port`` then holds the chosen one)."""
        connect = functools.partial(AsyncClient, self.broker, timeout=self.request_timeout, curve=self.curve,
                                    liveness=self.broker_liveness, cluster_name=self.cluster_name,
                                    discovery_timeout=self.discovery_timeout)
        if self.broker.startswith("etcd://"):
            # the client finds the broker there as it is made (blocking HTTP, up to discovery_timeout
            # s): in a thread, once; its zmq.asyncio socket takes this loop at its first use
            self._making = asyncio.get_running_loop().run_in_executor(None, connect)
            # cancelled meanwhile, the client is still made: close() waits for it and closes it
            self.client = await asyncio.shield(self._making)
            log.info("broker of cluster %r in etcd %s: %s", self.cluster_name, self.broker, self.client.address)
        else:
            self.client = connect()
        self.runner = GuardedRunner(self.app(), handler_cancellation=True, access_log=None,
                                    read_timeout=self.read_timeout, max_connections=self.max_connections)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self.close()
            raise OSError(f"cannot bind the HTTP gateway to {self.host}:{self.port}: {e.strerror or e}") from None
        self.port = self.runner.addresses[0][1]
        log.info("OpenAI-compatible gateway on %s (broker %s)", self.url, self.broker)
        if not self.api_key:
            warn_exposed([self.host], "an HTTP API key", f"set --api-key, auth.api_key or ${API_KEY_ENV}")

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.client is None and self._making is not None:    # start() cancelled mid-lookup
            try:
                self.client = await asyncio.wait_for(asyncio.shield(self._making), self.discovery_timeout + 5)
            except Exception:        # no client was made (or none in time): nothing to close
                pass
        self._making = None
        if self.client is not None:
            await self.client.close()
            self.client = None

    # -- middleware -----------------------------------------------------------------------------

    @web.middleware
    async def _request_id(self, request: web.Request, handler) -> web.StreamResponse:
        """The request's id: its X-Request-Id (checked), else a new one; every response carries it
        back (``_echo_request_id``) and a generation request's ``id`` holds it, as vLLM's."""
        given = request.headers.get(REQUEST_ID_HEADER)
        if given is not None and not REQUEST_ID.fullmatch(given):
            msg = (f"invalid {REQUEST_ID_HEADER} header {shown(given)}: expected 1-128 characters of "
                   "letters, digits and ._:@+=/-")
            if request.path.startswith("/v2"):      # Triton's error shape
                return web.json_response({"error": msg}, status=400)
            return error_response(HttpError(400, msg, REQUEST_ID_HEADER, "invalid_value"))
        request[RID] = given if given is not None else uuid.uuid4().hex
        request[ARRIVAL] = time.monotonic()       # for /perf_metrics
        try:
            return await handler(request)
        finally:                                  # its broker ids (request_ids) are free again
            self._held.difference_update(request.get(HELD, ()))

    @web.middleware
    async def _api_key(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path in self.open_paths or bearer_ok(request.headers.get("Authorization"), self.api_key):
            return await handler(request)
        given = "Authorization" in request.headers
        err = HttpError(401, ("Incorrect API key provided" if given else
                              "You didn't provide an API key: send 'Authorization: Bearer KEY'"),
                        None, "invalid_api_key")
        resp = error_response(err)
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as e:
            return error_response(e)
        except web.HTTPException as e:   # aiohttp's own: unknown route, wrong method, too large
            if e.status == 413:
                err = HttpError(413, f"request body is larger than the limit of {self.max_body_bytes} bytes",
                                None, "request_too_large")
            elif e.status == 404:
                err = HttpError(404, f"no route {request.path}; routes: /v1/completions, /v1/chat/completions, "
                                     "/v1/models, /health, /metrics, /perf_metrics, /version, /v2/...", None, "not_found")
            elif e.status == 408:
                err = HttpError(408, e.text or "request timeout", None, "request_timeout")
            elif e.status == 405:
                err = HttpError(405, f"method {request.method} is not allowed on {request.path}",
                                None, "method_not_allowed")
            else:
                err = HttpError(e.status, e.text or e.reason, None, None)
            return error_response(err)

    # -- helpers ----------------------------------------------------------------------------------

    async def _json(self, request: web.Request) -> dict:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise HttpError(413, f"request body of {request.content_length} bytes is larger than the "
                                 f"limit of {self.max_body_bytes} bytes", None, "request_too_large")
        raw = await read_body(request, self.read_timeout)   # 413 past client_max_size, 408 if slow
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:   # also: 4,300-digit integers, deep nesting
            raise HttpError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise HttpError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                            None, "invalid_json")
        return body

    def request_ids(self, request: web.Request, prefix: str, count: int = 1) -> tuple[str, list]:
        """(the id a response shows, the ids of its ``count`` broker requests): ``PREFIX-REQUEST_ID``
        and ``[PREFIX-REQUEST_ID]``, or for ``count`` > 1 (a Triton batch's rows, OpenAI's choices)
        ``[PREFIX-REQUEST_ID-i ...]``. While any of those is held by another request here (the
        same X-Request-Id again, or ``ID-1`` beside a batch of ``ID``), the broker ids get a
        random suffix before their ``-i``; the id shown stays the client's. They are held until the
        request's handler returns (``_request_id``)."""
        rid = f"{prefix}-{request[RID]}"

        def ids(base: str) -> list:
            return [base] if count == 1 else [f"{base}-{i}" for i in range(count)]
        keys = ids(rid)
        if not self._held.isdisjoint(keys):
            keys = ids(f"{rid}-{uuid.uuid4().hex[:12]}")
        self._held.update(keys)
        request[HELD] = [*request.get(HELD, ()), *keys]
        return rid, keys

    def record(self, request: web.Request, rid: str, submitted: float, c) -> None:
        """A finished request's timings (``c``: its ``client.request.Completion``, or None), for
        /perf_metrics; ``submitted``: when it went to the broker."""
        if c is not None:
            self.perf.add(rid, request[ARRIVAL], submitted, c.timings)

    async def _stats(self, metrics: bool = False) -> dict:
        try:
            return await self.client.ping(timeout=3.0, metrics=metrics)
        except ClientError as e:
            raise HttpError(503, f"the broker is not answering: {e}", None, "broker_unavailable",
                            "service_unavailable_error", retry_after=2) from None

    async def _model(self, name: Optional[str]) -> tuple[str, Optional[str]]:
        """The model a request names: (the name its answer shows, the name sent to the broker).
        A model a worker announced is sent as it is; a configured name no worker announced, or
        none, runs on the broker's default model (broker/pool.py); any other name is a 404."""
        if name is None:
            return (self.models[0] if self.models else "default"), None
        if name not in self.known_models:
            await self._served()     # a new name
        elif name not in self.worker_models:
            await self.served_if_stale()     # a configured one a worker may announce by now
        if name in self.worker_models:
            return name, name
        if name not in self.known_models:
            raise model_not_found(name, sorted(self.known_models))
        return name, None

    # -- routes -----------------------------------------------------------------------------------

    async def served_if_stale(self, max_age: float = 1.0) -> None:
        """Look at the workers again (``_served``) if the last look is older than ``max_age`` s:
        workers, their models and the default may have changed since."""
        if time.monotonic() - self._served_at > max_age:
            await self._served()

    async def _served(self) -> list:
        """The configured models, then those of the registered workers, in order (remembered)."""
        names = list(self.models)
        self._served_at = time.monotonic()
        stats = await self._stats()
        markers = {}
        for w in stats.get("workers", []):
            if w.get("model") and w["model"] not in names:
                names.append(w["model"])
            if w.get("model"):
                self.worker_models.add(w["model"])
                markers.setdefault(w["model"], tuple(w.get("chat_markers") or ()))
        self.chat_markers, self.default_model = markers, stats.get("default_model")
        self.known_models.update(names)
        return names

    async def list_models(self, request: web.Request) -> web.Response:
        names = await self._served()
        return web.json_response(ModelList(data=[ModelCard(id=n, created=self.created) for n in names]).model_dump())

    async def get_model(self, request: web.Request) -> web.Response:
        name, names = request.match_info["model"], await self._served()   # what is up now
        if name not in names:
            raise model_not_found(name, names)
        return web.json_response(ModelCard(id=name, created=self.created).model_dump())

    async def health(self, request: web.Request) -> web.Response:
        try:
            stats = await self._stats()
        except HttpError as e:
            return web.json_response({"status": "unavailable", "reason": e.message}, status=503,
                                     headers={"Retry-After": "2"})
        up = {"context": 0, "generation": 0, "both": 0}
        draining = 0
        for w in stats.get("workers", []):
            if w.get("draining"):       # leaving: it serves what it holds, nothing new
                draining += 1
                continue
            up[w["role"]] = up.get(w["role"], 0) + 1
        # a `both` worker runs either phase, so it counts toward both minimums
        have = {r: up.get(r, 0) + up["both"] for r in ("context", "generation")}
        short = {r: (have[r], n) for r, n in self.min_workers.items() if have.get(r, 0) < n}
        body = {"status": "ok" if not short else "unavailable", "workers": up, "draining": draining,
                "minimum": self.min_workers, "queued": stats.get("queued", 0)}
        if short:
            body["reason"] = "; ".join(f"{r} workers up {h}, need {n}" for r, (h, n) in short.items())
            return web.json_response(body, status=503, headers={"Retry-After": "2"})
        return web.json_response(body)

    async def metrics(self, request: web.Request) -> web.Response:
        stats = await self._stats(metrics=True)
        # the exposition version in the content type tells a scraper which text format this is
        text = stats.get("prometheus", "")
        return web.Response(body=(text + trtllm_metrics(stats, text, time.time())).encode(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST, "X-Content-Type-Options": "nosniff"})

    async def perf_metrics(self, request: web.Request) -> web.Response:
        return web.json_response(self.perf.drain())

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_request(CompletionRequest, await self._json(request))
        model = await self._model(req.model)
        return await self._serve(request, "cmpl", "text_completion", model, req, req.sampling(16), chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_request(ChatCompletionRequest, await self._json(request))
        model = await self._model(req.model)
        return await self._serve(request, "chatcmpl", "chat.completion", model, req,
                                 req.sampling(self.chat_max_tokens), chat=True)

    async def _serve(self, request, prefix, obj, names, req, sampling, chat) -> web.StreamResponse:
        """``names``: ``_model``'s (shown, sent to the broker); client/openai_serve.py answers."""
        from .openai_serve import serve         # it imports this module
        return await serve(self, request, prefix, obj, names, req, sampling, chat)


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every response, streamed or not, carries the request's id back."""
    rid = request.get(RID)
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid


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
    ap.add_argument("--broker", required=True, metavar="tcp://HOST:PORT|etcd://HOST:PORT",
                    help="the broker's frontend address, or the etcd server the broker registered in "
                         "(its --disagg-cluster-uri; with --cluster-name)")
    ap.add_argument("--cluster-name", default="default",
                    help="with an etcd:// --broker: the cluster whose broker to serve (default: default)")
    ap.add_argument("--discovery-timeout", type=float, default=60.0,
                    help="with an etcd:// --broker: seconds to wait for a broker there (default: 60)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    ap.add_argument("--model", action="append", default=[], help="model name to serve (repeatable; "
                    "the models of registered workers are served too)")
    ap.add_argument("--min-context", type=int, default=1, help="context workers /health needs (default: 1)")
    ap.add_argument("--min-generation", type=int, default=1, help="generation workers /health needs (default: 1)")
    ap.add_argument("--api-key", default=None, help=f"HTTP API key every route but /health (and /metrics) "
                    f"needs as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    ap.add_argument("--metrics-need-key", action="store_true", help="ask the API key on /metrics too")
    ap.add_argument("--curve-key", default=None, metavar="KEY_SECRET_FILE",
                    help="this gateway's CURVE key pair (a NAME.key_secret of `broker keygen`)")
    ap.add_argument("--curve-server-key", default=None, metavar="KEY_FILE", help="the broker's CURVE public key")
    ap.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT,
                    help="seconds a client has to send a request's head, and its body "
                         f"(default: {DEFAULT_READ_TIMEOUT:g})")
    ap.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                    help=f"open connections at most; more get 503 (default: {DEFAULT_MAX_CONNECTIONS})")
    ap.add_argument("--triton-chat-template", default="auto", choices=TRITON_CHAT_TEMPLATE,
                    help="apply the model's chat template to a Triton text_input: auto (default) when "
                         "the model ships one and the text holds none of its markers, on, or off "
                         "(as the Triton BLS: the text as it is)")
    ap.add_argument("--perf-metrics-max-requests", type=int, default=DEFAULT_MAX_REQUESTS,
                    help="finished requests whose timings /perf_metrics keeps until read (default: "
                         f"{DEFAULT_MAX_REQUESTS}; 0: none)")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        curve = curve_client(args.curve_key, args.curve_server_key)
        api_key = api_key_from(args.api_key, None)
    except ConfigError as e:
        print(f"gateway: error: {e}", file=sys.stderr)
        return 2
    try:
        gw = Gateway(args.broker, host=args.host, port=args.port, models=tuple(args.model),
                     min_workers={"context": args.min_context, "generation": args.min_generation},
                     api_key=api_key, metrics_need_key=args.metrics_need_key, curve=curve,
                     read_timeout=args.read_timeout, max_connections=args.max_connections,
                     triton_chat_template=args.triton_chat_template,
                     perf_metrics_max_requests=args.perf_metrics_max_requests,
                     cluster_name=args.cluster_name, discovery_timeout=args.discovery_timeout)
    except ValueError as e:
        print(f"gateway: error: {e}", file=sys.stderr)
        return 2

    async def run() -> None:
        await gw.start()
        print(f"gateway ready http={gw.url} broker={gw.client.address}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await gw.close()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except (OSError, ClientError) as e:
        print(f"gateway: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
