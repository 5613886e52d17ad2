"""The OpenAI routes' answers (``Gateway._serve``): one request per choice (``n``, ``best_of``:
client/openai_choices.py), gathered into one JSON body, or merged into one server-sent event
stream whose chunks carry their choice's ``index``, each choice's role first and finish last,
then the usage (``include_usage``; ``continuous_usage_stats``: on every chunk, every choice's
tokens so far). An error before the stream starts is its HTTP status; after, the last event. A
client that leaves cancels every choice's request (each stream is closed on the way out).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from aiohttp import web

from .errors import ClientError
from .gateway import SSE_HEADERS, failure_to_http, first_chunk
from .openai_choices import ChoiceLogprobs, best_of, choice_seeds, total_usage
from .openai_models import AssistantMessage, Choice, Completion, Delta, Usage

log = logging.getLogger("gateway")


@dataclass
class _Answer:
    """What every chunk or body of one answer shares."""
    rid: str                 # the id the answer shows
    keys: list               # its choices' broker request ids
    obj: str
    created: int
    model: str
    chat: bool
    echo: str                # the prompt text before a completion's answer, or ""
    record: Callable         # the finished choices' completions, for /perf_metrics

    def choice(self, i: int, text: str, finish: Optional[str], logprobs, first: bool = False) -> Choice:
        if not self.chat:
            return Choice(index=i, text=text, logprobs=logprobs, finish_reason=finish)
        d = Delta(role="assistant", content=text) if first else Delta(content=text or None)
        return Choice(index=i, delta=d, logprobs=logprobs, finish_reason=finish)


async def serve(gw, request: web.Request, prefix: str, obj: str, names: tuple, req, sampling: dict,
                chat: bool) -> web.StreamResponse:
    """Answer an OpenAI (chat) completion ``req`` on ``gw`` (a ``Gateway``), with ``sampling``
    its ``AsyncClient`` arguments; ``names``: the model shown and the one sent to the broker."""
    model, route = names
    n, runs = req.choices
    rid, keys = gw.request_ids(request, prefix, runs)      # a choice's: KEY-i
    created, submitted = int(time.time()), time.monotonic()
    inputs, input_field = req.inputs(), "messages" if chat else "prompt"
    shown_logprobs = "logprobs" in sampling
    if runs > n and not shown_logprobs:
        sampling = dict(sampling, logprobs=0)        # best_of ranks the samples by them
    calls = [{**inputs, **sampling, **({} if seed is None else {"seed": seed}), "model": route,
              "request_id": k, "timeout": gw.request_timeout}
             for k, seed in zip(keys, choice_seeds(sampling.get("seed"), runs))]
    echo = req.prompt if not chat and req.echo else ""
    if echo and shown_logprobs:       # the prompt's, once: every choice shows the first's
        calls[0]["prompt_logprobs"] = sampling["logprobs"]

    def record(done: list) -> None:
        for i, c in enumerate(done):
            gw.record(request, rid if runs == 1 else f"{rid}-{i}", submitted, c)

    answer = _Answer(rid, keys, obj, created, model, chat, echo, record)
    async with contextlib.AsyncExitStack() as held:
        try:   # each submitted at once (nothing awaited between)
            streams = [await held.enter_async_context(gw.client.stream(**kw)) for kw in calls]
            if req.stream:
                return await _stream(request, answer, req, streams, input_field)
            done = await gather_all(_completion(st) for st in streams)
        except ClientError as e:
            raise failure_to_http(e, input_field) from None
    record(done)
    prompt = done[0].prompt_logprobs
    done = best_of(done, n) if runs > n else done
    choices = []
    for i, c in enumerate(done):
        lps = ChoiceLogprobs(chat, echo).render(c.logprobs, prompt) if shown_logprobs else None
        choices.append(Choice(index=i, message=AssistantMessage(content=c.text), logprobs=lps,
                              finish_reason=c.finish_reason) if chat else
                       Choice(index=i, text=echo + c.text, logprobs=lps, finish_reason=c.finish_reason))
    return web.json_response(Completion(id=rid, object=obj, created=created, model=model,
                                        choices=choices, usage=Usage.of(total_usage(done))).model_dump())


async def _stream(request: web.Request, a: _Answer, req, streams: list, input_field: str) -> web.StreamResponse:
    """The choices' streams merged into one server-sent event stream."""
    firsts = await gather_all(first_chunk(st, input_field) for st in streams)
    resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await resp.prepare(request)
    chunk_obj = a.obj + ".chunk" if a.chat else a.obj
    renders = [ChoiceLogprobs(a.chat, a.echo) for _ in streams]
    prompt = firsts[0].prompt_logprobs if firsts[0] is not None else None
    n_out = sum(len(f.token_ids) for f in firsts if f is not None)    # output tokens so far

    def chunk(choices: list, usage: Optional[Usage] = None) -> bytes:
        if usage is None and choices and req.continuous_usage:   # the prompt and the output so far
            usage = Usage.running(streams[0].prompt_tokens, n_out)     # cached_tokens: only at the end
        return Completion(id=a.rid, object=chunk_obj, created=a.created, model=a.model, choices=choices,
                          usage=usage).sse()

    def delta(i: int, ch, first: bool = False) -> bytes:
        text = (a.echo if first else "") + (ch.text if ch else "")
        lps = renders[i].render(ch.logprobs if ch else None, prompt if first else None)
        return chunk([a.choice(i, text, None, lps, first)])

    queue: asyncio.Queue = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(i, st, queue)) for i, st in enumerate(streams)]
    try:
        for i, first in enumerate(firsts):
            await resp.write(delta(i, first, first=True))
        left = len(streams)
        while left:
            i, ch, error = await queue.get()
            if error is not None:
                await resp.write(b"data: " + json.dumps(failure_to_http(error, input_field).body()).encode()
                                 + b"\n\n")
                await resp.write(b"data: [DONE]\n\n")
                return resp
            if ch is not None:
                n_out += len(ch.token_ids)
                if ch.text or ch.logprobs:
                    await resp.write(delta(i, ch))
                continue
            left -= 1
            c = streams[i].completion
            await resp.write(chunk([a.choice(i, "", c.finish_reason if c else "stop", None)]))
        done = [st.completion for st in streams if st.completion is not None]
        a.record(done)
        if req.include_usage:
            await resp.write(chunk([], Usage.of(total_usage(done))))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (ConnectionError, RuntimeError) as e:   # the client went away: the streams cancel
        log.info("client of %s disconnected mid-stream (%s); cancelling it", ", ".join(a.keys),
                 type(e).__name__)
    finally:
        for t in pumps:
            t.cancel()
    return resp


async def _completion(stream):
    """A submitted request's ``Completion``, once its stream ends."""
    async for _ in stream:
        pass
    return stream.completion


async def _pump(i: int, stream, queue: asyncio.Queue) -> None:
    """Put choice ``i``'s chunks in ``queue`` as ``(i, chunk, None)``, then ``(i, None, None)``
    at its end, or ``(i, None, error)``."""
    try:
        async for ch in stream:
            queue.put_nowait((i, ch, None))
        queue.put_nowait((i, None, None))
    except ClientError as e:
        queue.put_nowait((i, None, e))


async def gather_all(awaitables) -> list:
    """Every result, in order; the first failure (or this task's cancel) cancels the rest."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
