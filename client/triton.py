"""Triton's KServe v2 HTTP API on the gateway, so that clients of the Triton TensorRT-LLM
backend (its ``ensemble`` and (disaggregated) BLS models, ``tritonclient.http``) work unchanged.

Routes (each model route also under ``/v2/models/{m}/versions/1/...``):
``POST /v2/models/{m}/generate`` (one JSON response), ``POST .../generate_stream`` (server-sent
events ``data: {json}``, no ``[DONE]``; an error after the stream started is one
``data: {"error": "..."}`` event), ``POST .../infer`` (KServe v2 tensors, JSON or binary, a
batch of rows run at once), ``GET /v2/models/{m}`` (metadata), ``GET .../config``,
``GET .../ready``, ``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready`` (as ``/health``).
Errors are Triton's ``{"error": "message"}``. The names ``ensemble``, ``tensorrt_llm_bls`` and
``disaggregated_serving_bls`` stand for the served model. The request mapping is in
``client/triton_bls.py``, the tensor format in ``client/kserve.py``; requests go through the
gateway's ``AsyncClient`` and its error mapping (``failure_to_http``).
"""
from __future__ import annotations

import functools
import json
import logging
import time
from typing import Optional

from aiohttp import web

from .errors import ClientError
from .gateway import failure_to_http, first_chunk
from .kserve import HEADER, TensorError, encode_infer_response, parameters, parse_infer_request
from .openai_models import HttpError
from .openai_serve import gather_all
from .triton_bls import (ALIASES, OUTPUTS, VERSION, BlsRequest, bls_request, json_values, model_config,
                         model_metadata, output_tensors, tensor_rows, token_log_probs)

log = logging.getLogger("gateway.triton")

MAX_BATCH = 64
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def _event(body: dict) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def triton_errors(handler):
    """Render ``HttpError`` (and a malformed tensor) as Triton does: ``{"error": "message"}``."""
    @functools.wraps(handler)
    async def wrapped(self, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(self, request)
        except HttpError as e:
            headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
            return web.json_response({"error": e.message}, status=e.status, headers=headers)
        except TensorError as e:
            return web.json_response({"error": str(e)}, status=400)
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": f"request body is larger than the limit of "
                                               f"{self.gw.max_body_bytes} bytes"}, status=413)
    return wrapped


class TritonApi:
    """The ``/v2`` routes of one ``Gateway`` (its client, health rule, body limit and timeout)."""

    def __init__(self, gateway):
        self.gw = gateway

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(base, self.metadata)
            r.add_get(base + "/config", self.config)
            r.add_get(base + "/ready", self.model_ready)
            r.add_post(base + "/generate", self.generate)
            r.add_post(base + "/generate_stream", self.generate_stream)
            r.add_post(base + "/infer", self.infer)

    # -- the model a route names ------------------------------------------------------------------

    async def _model(self, request: web.Request) -> str:
        return (await self._route(request))[0]

    async def _route(self, request: web.Request) -> tuple[str, Optional[str]]:
        """The model a route names, and the name sent to the broker: the aliases (and a
        configured name no worker announced) run on the broker's default model."""
        name, version = request.match_info["model"], request.match_info.get("version")
        route = None
        if name not in ALIASES:
            try:
                route = (await self.gw._model(name))[1]
            except HttpError as e:
                if e.status != 404:
                    raise
                served = [n for n in sorted(self.gw.known_models) if n not in ALIASES]
                raise HttpError(404, f"model {name!r} is not served here; available: "
                                     f"{', '.join(list(ALIASES) + served)}", "model", "model_not_found") from None
        if version not in (None, "", VERSION):
            raise HttpError(404, f"model {name!r} has no version {version!r}; versions: {VERSION}", "version",
                            "model_not_found")
        return name, route

    # -- health and metadata ----------------------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "disagg-serve", "version": "1",
                                  "extensions": ["generate", "binary_tensor_data", "model_configuration"]})

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    @triton_errors
    async def ready(self, request: web.Request) -> web.Response:
        return await self._ready(request)

    async def _ready(self, request: web.Request) -> web.Response:
        health = await self.gw.health(request)     # the /health rule: enough workers up
        if health.status == 200:
            return web.Response(status=200)
        reason = json.loads(health.text).get("reason", "not ready")
        return web.json_response({"error": reason}, status=503, headers={"Retry-After": "2"})

    @triton_errors
    async def model_ready(self, request: web.Request) -> web.Response:
        await self._model(request)
        return await self._ready(request)

    @triton_errors
    async def metadata(self, request: web.Request) -> web.Response:
        return web.json_response(model_metadata(await self._model(request)))

    @triton_errors
    async def config(self, request: web.Request) -> web.Response:
        return web.json_response(model_config(await self._model(request), MAX_BATCH))

    # -- inference --------------------------------------------------------------------------------

    def _rids(self, request: web.Request, rows: int = 1) -> list:
        """(the id /perf_metrics shows, the broker request id) of each of a request's ``rows``:
        ``triton-`` and its X-Request-Id (or a new id), and ``-i`` for each row of a batch; the
        broker's id has a suffix where another request holds the same (``Gateway.request_ids``)."""
        shown, keys = self.gw.request_ids(request, "triton", rows)
        return [(shown if rows == 1 else f"{shown}-{i}", key) for i, key in enumerate(keys)]

    async def _chat(self, route: Optional[str]) -> Optional[tuple]:
        """The chat markers of the model ``route`` runs on (the broker's default for None), for
        ``BlsRequest.inputs``: None when text_input goes as it is (``--triton-chat-template``
        off, or auto and the model ships no template), () when always templated (on)."""
        mode = self.gw.triton_chat_template
        if mode != "auto":
            return None if mode == "off" else ()
        await self.gw.served_if_stale()
        return self.gw.chat_markers.get(route or self.gw.default_model) or None

    async def _run(self, request: web.Request, req: BlsRequest, route: Optional[str], markers: Optional[tuple],
                   ids: tuple) -> tuple[str, list]:
        """One request to its end on model ``route`` through the gateway's client: (answer,
        its tokens' log-probabilities); ``ids``: (shown, broker) as ``_rids`` makes them."""
        submitted = time.monotonic()
        try:
            c = await self.gw.client.generate(**req.inputs(markers), request_id=ids[1],
                                              timeout=self.gw.request_timeout, model=route, **req.sampling)
        except ClientError as e:
            raise _failure(e) from None
        self.gw.record(request, ids[0], submitted, c)
        return c.text, token_log_probs(c)

    async def _request(self, request: web.Request) -> tuple[str, Optional[str], BlsRequest]:
        name, route = await self._route(request)
        return name, route, bls_request(json_values(await self.gw._json(request)))

    @triton_errors
    async def generate(self, request: web.Request) -> web.Response:
        name, route, req = await self._request(request)
        if req.stream:
            raise HttpError(400, "stream=true answers with several responses: use "
                                 f"/v2/models/{name}/generate_stream", "stream", "unsupported_value")
        text, lps = await self._run(request, req, route, await self._chat(route), self._rids(request)[0])
        return web.json_response({"model_name": name, "model_version": VERSION, **req.outputs(text, lps)})

    @triton_errors
    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        name, route, req = await self._request(request)
        head = {"model_name": name, "model_version": VERSION}
        if not req.stream:      # as the BLS without `stream`: one response with the whole answer
            text, lps = await self._run(request, req, route, await self._chat(route), self._rids(request)[0])
            resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
            await resp.prepare(request)
            await resp.write(_event({**head, **req.outputs(text, lps)}))
            await resp.write_eof()
            return resp
        (shown, rid), submitted = self._rids(request)[0], time.monotonic()
        stream = self.gw.client.stream(**req.inputs(await self._chat(route)), request_id=rid,
                                       timeout=self.gw.request_timeout, model=route, **req.sampling)
        async with stream:
            first = await first_chunk(stream, "text_input")
            resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
            await resp.prepare(request)
            try:
                lps = token_log_probs(first)
                await resp.write(_event({**head, **req.outputs(first.text if first else "", lps, True)}))
                cum = sum(lps)                   # at least one response, then one per chunk
                try:
                    async for ch in stream:
                        lps = token_log_probs(ch)
                        await resp.write(_event({**head, **req.outputs(ch.text, lps, True, cum)}))
                        cum += sum(lps)
                except ClientError as e:
                    await resp.write(_event({"error": _failure(e).message}))
                self.gw.record(request, shown, submitted, stream.completion)
                await resp.write_eof()
            except (ConnectionError, RuntimeError) as e:   # the client went away: `async with` cancels
                log.info("client of %s disconnected mid-stream (%s); cancelling it", rid, type(e).__name__)
            return resp

    @triton_errors
    async def infer(self, request: web.Request) -> web.Response:
        name, route = await self._route(request)
        if request.content_length is not None and request.content_length > self.gw.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.gw.max_body_bytes, actual_size=request.content_length)
        head, tensors = parse_infer_request(await request.read(), request.headers.get(HEADER))
        reqs = [bls_request(row) for row in tensor_rows(tensors, MAX_BATCH)]
        if any(r.stream for r in reqs):
            raise HttpError(400, f"stream=true answers with several responses: use /v2/models/{name}/generate_stream",
                            "stream", "unsupported_value")
        wanted, binary = _requested_outputs(head)
        markers = await self._chat(route)
        answers = await gather_all(self._run(request, r, route, markers, ids)    # one row failed: stop the others
                                   for r, ids in zip(reqs, self._rids(request, len(reqs))))
        reply = {"model_name": name, "model_version": VERSION}
        if isinstance(head.get("id"), str):
            reply["id"] = head["id"]
        body, headers = encode_infer_response(reply, output_tensors(reqs, answers, wanted), binary)
        return web.Response(body=body, headers=headers)


def _failure(e: ClientError) -> HttpError:
    return failure_to_http(e, "text_input")


def _requested_outputs(head: dict) -> tuple[list, set]:
    """The outputs an ``infer`` request asks for (all by default), and those it wants binary."""
    every_binary = parameters(head, "the request").get("binary_data_output") is True
    asked: Optional[list] = head.get("outputs")
    if asked is None:
        return list(OUTPUTS), set(OUTPUTS) if every_binary else set()
    if not isinstance(asked, list):
        raise HttpError(400, "outputs must be a list of {name, parameters}", "outputs", "invalid_value")
    wanted, binary = [], set()
    for o in asked:
        n = o.get("name") if isinstance(o, dict) else None
        if n not in OUTPUTS:
            raise HttpError(400, f"unknown output {json.dumps(n)[:40]}; outputs: {', '.join(OUTPUTS)}", "outputs",
                            "unknown_field")
        wanted.append(n)
        if parameters(o, f"output {n!r}").get("binary_data", every_binary) is True:
            binary.add(n)
    return wanted, binary
