"""Serving benchmark: TTFT, time per output token, inter-token latency, end-to-end latency,
throughput and goodput of a deployment, through the Python client or the OpenAI HTTP API.

Workloads: synthetic prompts of a chosen input and output length (token ids, or text of about
that many tokens), or a ShareGPT-format JSON file. Arrivals: Poisson at ``--request-rate`` (a
comma-separated list sweeps rates; ``inf`` sends everything at once), optionally capped at
``--concurrency`` requests in flight. Synthetic requests set ``ignore_eos`` so every request
produces exactly the requested output length.

Goodput follows DistServe: the highest request rate at which at least ``--slo-attainment`` of
the requests meet both the TTFT and the TPOT limit. Each measured rate reports its attainment;
the goodput is the highest swept rate that reaches the target (so sweep rates to find it).

Targets: an existing broker (``--frontend``) or HTTP gateway (``--url``), or a deployment this
benchmark starts and stops itself (``--launch``); ``--compare`` runs the same workload on an
aggregated deployment (``both`` workers) and a disaggregated one (a context and a generation
worker) in one run and reports disaggregated / aggregated ratios; ``--compare-reuse`` runs each
with prefix caching on and off, ``--compare-routers`` with each of the context servers' routers
(``--context-instances`` context workers), and reports the ratios to the first.

    python -m bench.throughput --launch --compare --model smollm2-135m --request-rate 0.5,1
    python -m bench.throughput --frontend tcp://127.0.0.1:5555 --concurrency 8
    python -m bench.throughput --url http://127.0.0.1:8000 --dataset sharegpt.json --num-prompts 100
    python -m bench.throughput --launch --compare-routers round_robin,kv_cache_aware --context-instances 2 \
        --workload shared-prefix --num-prefixes 4 --kv-max-tokens 2048
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from tqdm import tqdm

from bench.common import RESULTS, children, machine, progress, start_broker, summarize, table, write_json
from broker.config import ROUTERS
from broker.launch import wait_for_workers, worker_command

# common English words: with a leading space, each is one token for byte-level BPE tokenizers
_WORDS = ("the of and to in is you that it he was for on are as with his they at be this have "
          "from or one had by word but not what all were we when your can said there use an each "
          "which she do how their if will up other about out many then them these so some her "
          "would make like him into time has look two more write go see number no way could people "
          "my than first water been call who oil its now find long down day did get come made may "
          "part over new sound take only little work know place year live me back give most very "
          "after thing our just name good sentence man think say great where help through much "
          "before line right too mean old any same tell boy follow came want show also around form "
          "three small set put end does another well large must big even such because turn here").split()


@dataclass
class Spec:
    """One request of the workload."""
    output_len: int
    input_len: int                       # tokens (estimated for text prompts)
    token_ids: Optional[list] = None
    prompt: Optional[str] = None


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    start: float = 0.0                   # monotonic, when the request was sent
    ttft: Optional[float] = None
    e2e: Optional[float] = None
    itl: list = field(default_factory=list)   # gaps between consecutive output chunks
    output_tokens: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0               # prompt tokens the server's prefix cache supplied

    @property
    def tpot(self) -> Optional[float]:
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# ---------------------------------------------------------------------------------------------
# workloads

def synthetic(n: int, input_len: int, output_len: int, seed: int, text: bool) -> list[Spec]:
    """``n`` requests of random prompts: token ids 3-255 (valid for every model here, the tiny
    one's byte vocabulary included), or text of about ``input_len`` common words."""
    rng = random.Random(seed)
    specs = []
    for _ in range(n):
        if text:
            specs.append(Spec(output_len, input_len, prompt=" ".join(rng.choice(_WORDS) for _ in range(input_len))))
        else:
            specs.append(Spec(output_len, input_len, token_ids=[rng.randrange(3, 256) for _ in range(input_len)]))
    return specs


def shared_prefix(n: int, prefix_len: int, input_len: int, output_len: int, seed: int,
                  num_prefixes: int = 1) -> list[Spec]:
    """A long system prompt (``prefix_len`` tokens) before each request's own ``input_len``
    random tokens: what prefix caching serves from cache after the first. With several system
    prompts (``num_prefixes``), each request draws one at random: a router that sends each to
    the worker already holding it finds it cached there (kv_cache_aware), one that does not
    makes every worker prefill (and hold) every prefix (round_robin)."""
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 256) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    return [Spec(output_len, prefix_len + input_len,
                 token_ids=systems[rng.randrange(num_prefixes) if num_prefixes > 1 else 0]
                 + [rng.randrange(3, 256) for _ in range(input_len)]) for _ in range(n)]


def multi_turn(n: int, turns: int, input_len: int, output_len: int, seed: int) -> list[Spec]:
    """``n`` requests from chats of ``turns`` turns that resend their history: turn k's prompt is
    turn k-1's prompt, a reply of ``output_len`` tokens and a new message of ``input_len``. The
    chats are interleaved (every chat's turn 1, then every turn 2, ...), so under a concurrency
    cap below the number of chats a turn arrives after the one before it has ended."""
    rng = random.Random(seed)
    chats = -(-n // turns)
    history = [[] for _ in range(chats)]
    specs = []
    for _turn in range(turns):
        for c in range(chats):
            if len(specs) == n:
                break
            if history[c]:
                history[c] += [rng.randrange(3, 256) for _ in range(output_len)]   # the reply
            history[c] += [rng.randrange(3, 256) for _ in range(input_len)]
            specs.append(Spec(output_len, len(history[c]), token_ids=list(history[c])))
    return specs


def sharegpt(path: str, n: int, seed: int, max_input: int, max_output: int,
             output_len: Optional[int]) -> list[Spec]:
    """The first human turn of ShareGPT conversations as prompts. Output length: ``output_len``
    if given, else the first reply's length estimated at 4 characters a token (the benchmark has
    no tokenizer), clipped to ``max_output``. Prompts over ``max_input`` estimated tokens are skipped."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
    rng = random.Random(seed)
    rng.shuffle(data)
    specs = []
    for conv in data:
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        human, reply = turns[0], turns[1]
        if not (isinstance(human, dict) and isinstance(reply, dict)):
            continue
        prompt, answer = human.get("value"), reply.get("value")
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(answer, str):
            continue
        est_in = max(1, len(prompt) // 4)
        if est_in > max_input:
            continue
        out = output_len or max(4, min(max_output, len(answer) // 4))
        specs.append(Spec(out, est_in, prompt=prompt))
        if len(specs) == n:
            break
    if not specs:
        raise ValueError(f"{path}: no usable conversation (need conversations[0..1] with 'value' text, "
                         f"prompts of at most {max_input} estimated tokens)")
    return specs


# ---------------------------------------------------------------------------------------------
# drivers: one request each, timed from send to the last token

class ClientDriver:
    """Through ``client.AsyncClient`` to a broker frontend."""
    name = "client"

    def __init__(self, frontend: str, timeout: float):
        from client import AsyncClient
        self.client = AsyncClient(frontend, timeout=timeout)

    async def run(self, spec: Spec) -> Result:
        r = Result(start=time.monotonic())
        last = r.start
        kw = {"token_ids": spec.token_ids} if spec.token_ids is not None else {"prompt": spec.prompt}
        try:
            stream = self.client.stream(max_tokens=spec.output_len, ignore_eos=True, temperature=0.0, **kw)
            async with stream:
                async for chunk in stream:
                    now = time.monotonic()
                    if r.ttft is None:
                        r.ttft = now - r.start
                    else:
                        r.itl.append(now - last)
                    last = now
                    r.output_tokens += len(chunk.token_ids)
            r.e2e = time.monotonic() - r.start
            usage = stream.completion.usage if stream.completion else {}
            r.input_tokens = int(usage.get("prompt_tokens") or spec.input_len)
            r.output_tokens = int(usage.get("completion_tokens") or r.output_tokens)
            r.cached_tokens = int(usage.get("cached_tokens") or 0)
            r.ok = True
        except Exception as e:   # a failed request is counted and reported, never fatal
            r.error = f"{type(e).__name__}: {e}"
        return r

    async def close(self) -> None:
        await self.client.close()


_SEND_ATTEMPTS = 3     # a stale keep-alive connection costs one; a second stale one is rare


class HttpDriver:
    """Streaming ``POST /v1/completions`` (server-sent events) to an OpenAI-compatible URL."""
    name = "http"

    def __init__(self, url: str, model: Optional[str], timeout: float):
        import aiohttp
        self.aiohttp = aiohttp
        self.url = url.rstrip("/") + "/v1/completions"
        self.model = model
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=timeout))

    async def run(self, spec: Spec) -> Result:
        body = {"prompt": spec.token_ids if spec.token_ids is not None else spec.prompt,
                "max_tokens": spec.output_len, "ignore_eos": True, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        r = Result(start=time.monotonic())
        last, chunks, usage = r.start, 0, None
        try:
            async with await self._post(body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
                buf = b""
                async for data in resp.content.iter_any():
                    buf += data
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        for line in event.split(b"\n"):
                            if not line.startswith(b"data:"):
                                continue
                            payload = line[5:].strip()
                            if payload == b"[DONE]":
                                continue
                            d = json.loads(payload)
                            if "error" in d:
                                raise RuntimeError(f"error event: {d['error']}")
                            if d.get("usage"):
                                usage = d["usage"]
                            choices = d.get("choices") or []
                            if not choices or (not choices[0].get("text") and r.ttft is not None):
                                continue
                            now = time.monotonic()
                            if r.ttft is None:
                                r.ttft = now - r.start
                            else:
                                r.itl.append(now - last)
                            last = now
                            chunks += 1
            r.e2e = time.monotonic() - r.start
            if r.ttft is None:
                raise RuntimeError("the stream ended without a token")
            r.output_tokens = int((usage or {}).get("completion_tokens") or chunks)
            r.input_tokens = int((usage or {}).get("prompt_tokens") or spec.input_len)
            details = (usage or {}).get("prompt_tokens_details") or {}
            r.cached_tokens = int(details.get("cached_tokens") or 0)
            r.ok = True
        except Exception as e:
            r.error = f"{type(e).__name__}: {e}"
        return r

    async def _post(self, body: dict):
        """The response to ``body``, sent again when the pooled keep-alive connection it went out
        on turns out closed by the server before any answer byte came (llama.cpp's server closes
        idle ones: "Can not write request body"). Nothing was generated for the lost attempt; the
        request's clock keeps running from the first send."""
        for attempt in range(_SEND_ATTEMPTS):
            try:
                return await self.session.post(self.url, json=body)
            except (self.aiohttp.ServerDisconnectedError, self.aiohttp.ClientOSError):
                if attempt == _SEND_ATTEMPTS - 1:
                    raise

    async def close(self) -> None:
        await self.session.close()


# ---------------------------------------------------------------------------------------------
# one measured run

async def run_load(driver, specs: list[Spec], rate: float, concurrency: Optional[int], seed: int,
                   bar: tqdm) -> tuple[list[Result], float]:
    """Send ``specs`` with Poisson arrivals at ``rate`` per second (``inf``: all at once), at most
    ``concurrency`` in flight; returns the results (in workload order) and the wall time."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    results: list = [None] * len(specs)

    async def one(i: int, spec: Spec) -> None:
        if sem is not None:
            async with sem:
                results[i] = await driver.run(spec)
        else:
            results[i] = await driver.run(spec)
        bar.set_postfix_str(f"errors {sum(1 for r in results if r is not None and not r.ok)}", refresh=False)
        bar.update(1)

    t0 = time.monotonic()
    tasks = []
    next_at = t0
    for i, spec in enumerate(specs):
        if not math.isinf(rate):
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += rng.expovariate(rate)
        tasks.append(asyncio.create_task(one(i, spec)))
    await asyncio.gather(*tasks)
    return results, time.monotonic() - t0


def metrics(results: list[Result], duration: float, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    good = [r for r in ok if r.ttft <= slo_ttft and (r.tpot is None or r.tpot <= slo_tpot)]
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else None,
        "output_token_throughput": out_tokens / duration if duration else None,
        "total_token_throughput": (out_tokens + sum(r.input_tokens for r in ok)) / duration if duration else None,
        "mean_input_tokens": sum(r.input_tokens for r in ok) / len(ok) if ok else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        # the share of prompt tokens served from the workers' prefix caches
        "cache_hit_rate": (sum(r.cached_tokens for r in ok) / sum(r.input_tokens for r in ok)
                           if ok and sum(r.input_tokens for r in ok) else None),
        "ttft_ms": summarize((r.ttft for r in ok), 1000),
        "tpot_ms": summarize((r.tpot for r in ok if r.tpot is not None), 1000),
        "itl_ms": summarize((x for r in ok for x in r.itl), 1000),
        "e2e_ms": summarize((r.e2e for r in ok), 1000),
        "slo_attainment": len(good) / len(results) if results else None,
        "good_request_throughput": len(good) / duration if duration else None,
    }


def goodput(runs: list[dict], target: float) -> Optional[float]:
    """DistServe goodput over a sweep: the highest finite measured rate whose SLO attainment
    reaches ``target``; None when no measured rate does."""
    ok = [r["request_rate"] for r in runs if not math.isinf(r["request_rate"])
          and r["metrics"]["slo_attainment"] is not None and r["metrics"]["slo_attainment"] >= target]
    return max(ok) if ok else None


# ---------------------------------------------------------------------------------------------
# deployments this benchmark starts itself

class Deployment:
    """A broker and workers as child processes (stopped by pid on close)."""

    def __init__(self, mode: str, model: str, http: bool, agg_instances: int, worker_options: dict,
                 ready_timeout: float, say, context_instances: int = 1, router: Optional[str] = None):
        self.procs = children(prefix=f"bench-{mode}-")
        try:
            extra = []
            if router:        # the context servers' (and `both` workers') router
                config = os.path.join(self.procs.tmp.name, "disagg_config.yaml")
                with open(config, "w") as f:
                    json.dump({"context_servers": {"router": {"type": router}}}, f)
                extra = ["--config", config]
            b = start_broker(self.procs, http=http, extra=extra)
            self.frontend, self.url = b["frontend"], b.get("http")
            if http and not self.url:
                raise RuntimeError("the broker printed no http= address; does `broker start` "
                                   "support --http-port?")
            opts = os.path.join(self.procs.tmp.name, "worker.yaml")
            with open(opts, "w") as f:
                json.dump(worker_options, f)      # JSON is YAML
            roles = ["both"] * agg_instances if mode == "agg" else ["context"] * context_instances + ["generation"]
            for i, role in enumerate(roles):
                self.procs.start(f"{role}-{i}", worker_command(role, b["backend"], model, f"bench-{role}-{i}",
                                                               options=opts, log_level="WARNING"))
            wait_for_workers(self.frontend, dict(Counter(roles)), ready_timeout, self.procs, say)
        except BaseException:
            self.procs.close()
            raise

    def close(self) -> None:
        self.procs.close()


# ---------------------------------------------------------------------------------------------

def parse_routers(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in ROUTERS]
    if bad or len(names) < 2 or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"invalid router list {text!r}: expected two or more different "
                                         f"of {', '.join(ROUTERS)}")
    return names


def parse_rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid request rate {part!r}: expected a number or inf") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"invalid request rate {part!r}: expected > 0")
        rates.append(v)
    return rates


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t = ap.add_argument_group("target (one of)")
    t.add_argument("--frontend", metavar="tcp://HOST:PORT", help="an existing broker's frontend (Python client)")
    t.add_argument("--url", metavar="http://HOST:PORT", help="an existing OpenAI-compatible gateway")
    t.add_argument("--launch", action="store_true", help="start (and stop) a deployment of --model")
    t.add_argument("--compare", action="store_true",
                   help="with --launch: aggregated and disaggregated deployments, same workload, one run")
    t.add_argument("--mode", choices=["agg", "disagg"], default="disagg",
                   help="with --launch and no --compare: which deployment to start")
    t.add_argument("--api", choices=["client", "http"], default="client",
                   help="with --launch: drive the Python client or the HTTP gateway")
    t.add_argument("--model", default="smollm2-135m", help="with --launch: smollm2-135m, tiny, or a path")
    t.add_argument("--http-model", default=None, help="the 'model' field of HTTP requests (default: none)")
    t.add_argument("--compare-reuse", action="store_true",
                   help="with --launch: run each deployment with prefix caching "
                        "(kv_cache_config.enable_block_reuse) on and off, in one run")
    t.add_argument("--compare-routers", type=parse_routers, default=None, metavar="ROUTER,ROUTER,...",
                   help="with --launch: run each deployment with each of these context-server routers "
                        f"({', '.join(ROUTERS)}), in one run, with ratios to the first")
    t.add_argument("--router", choices=ROUTERS, default=None,
                   help="with --launch: the context servers' router (default: the broker's)")
    t.add_argument("--agg-instances", type=int, default=1, help="'both' workers in the aggregated deployment")
    t.add_argument("--context-instances", type=int, default=1,
                   help="context workers in the disaggregated deployment (one generation worker)")
    t.add_argument("--kv-max-tokens", type=int, default=None,
                   help="with --launch: kv_cache_config.max_tokens of every worker (a smaller prefix cache)")
    t.add_argument("--worker-threads", type=int, default=1, help="torch threads per launched worker")
    t.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for launched workers")
    w = ap.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=32, help="measured requests per rate")
    w.add_argument("--input-len", type=int, default=128, help="synthetic prompt length, tokens")
    w.add_argument("--output-len", type=int, default=32, help="output tokens per synthetic request")
    w.add_argument("--prompt-format", choices=["ids", "text"], default="ids",
                   help="synthetic prompts as token ids, or as text of about --input-len words")
    w.add_argument("--workload", choices=["random", "shared-prefix", "multi-turn"], default="random",
                   help="synthetic prompts: independent random ones; a common system prompt of "
                        "--prefix-len tokens before --input-len own tokens; or chats of --turns turns "
                        "that resend their history (--input-len new tokens per turn)")
    w.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: system prompt tokens")
    w.add_argument("--num-prefixes", type=int, default=1,
                   help="shared-prefix: distinct system prompts, each request drawing one at random")
    w.add_argument("--turns", type=int, default=4, help="multi-turn: turns per chat")
    w.add_argument("--dataset", help="ShareGPT-format JSON file instead of synthetic prompts")
    w.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="fixed output length for --dataset (default: the reply's, estimated)")
    w.add_argument("--max-input-len", type=int, default=1024, help="--dataset: skip longer prompts (estimated tokens)")
    w.add_argument("--max-output-len", type=int, default=256, help="--dataset: clip output lengths")
    w.add_argument("--request-rate", type=parse_rates, default=[1.0],
                   help="Poisson arrival rate(s), requests/s, comma-separated to sweep; inf sends all at once")
    w.add_argument("--concurrency", type=int, default=None, help="at most this many requests in flight")
    w.add_argument("--warmup", type=int, default=2, help="unmeasured requests before each deployment's runs")
    w.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals")
    w.add_argument("--request-timeout", type=float, default=900, help="seconds per request")
    s = ap.add_argument_group("SLOs (goodput)")
    s.add_argument("--slo-ttft-ms", type=float, default=5000, help="time-to-first-token limit")
    s.add_argument("--slo-tpot-ms", type=float, default=250, help="time-per-output-token limit")
    s.add_argument("--slo-attainment", type=float, default=0.9, help="share of requests that must meet both")
    o = ap.add_argument_group("output")
    o.add_argument("--out", default=os.path.join(RESULTS, "throughput.json"), help="JSON results path")
    o.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    o.add_argument("--no-plot", action="store_true", help="write no PNG")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return ap


def check_args(ap: argparse.ArgumentParser, a) -> None:
    given = [n for n in ("frontend", "url") if getattr(a, n)] + (["launch"] if a.launch else [])
    if len(given) != 1:
        ap.error(f"give exactly one target: --frontend, --url or --launch (got {', '.join(given) or 'none'})")
    if (a.compare or a.compare_reuse or a.compare_routers or a.router) and not a.launch:
        ap.error("--compare, --compare-reuse, --compare-routers and --router need --launch: they start "
                 "the deployments themselves")
    if a.compare_routers and a.router:
        ap.error("give --router or --compare-routers, not both")
    if a.dataset and a.workload != "random":
        ap.error(f"--workload {a.workload} is synthetic: it cannot be combined with --dataset")
    if a.workload != "random" and a.prompt_format == "text":
        ap.error(f"--workload {a.workload} builds token-id prompts: drop --prompt-format text")
    if a.kv_max_tokens is not None and a.kv_max_tokens < 1:
        ap.error(f"--kv-max-tokens must be >= 1, got {a.kv_max_tokens}")
    for name in ("num_prompts", "input_len", "output_len", "agg_instances", "worker_threads", "prefix_len",
                 "turns", "context_instances", "num_prefixes"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.concurrency is not None and a.concurrency < 1:
        ap.error(f"--concurrency must be >= 1, got {a.concurrency}")
    if a.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {a.warmup}")
    if not 0 < a.slo_attainment <= 1:
        ap.error(f"--slo-attainment must be in (0, 1], got {a.slo_attainment}")


async def measure_target(a, driver, label: str, specs: list[Spec], say) -> list[dict]:
    """Warm-up, then one run per request rate, against one target."""
    if a.warmup:
        say(f"{label}: {a.warmup} warm-up request(s)")
        for spec in specs[:a.warmup]:
            r = await driver.run(Spec(min(spec.output_len, 4), spec.input_len, spec.token_ids, spec.prompt))
            if not r.ok:
                raise RuntimeError(f"{label}: warm-up request failed: {r.error}")
    runs = []
    for i, rate in enumerate(a.request_rate):
        with progress(len(specs), f"{label} rate={rate:g}", not a.no_progress) as bar:
            results, duration = await run_load(driver, specs, rate, a.concurrency, a.seed + i, bar)
        m = metrics(results, duration, a.slo_ttft_ms / 1000, a.slo_tpot_ms / 1000)
        runs.append({"target": label, "request_rate": rate, "concurrency": a.concurrency, "metrics": m,
                     "per_request": [{"ok": r.ok, "ttft_s": r.ttft, "tpot_s": r.tpot, "e2e_s": r.e2e,
                                      "output_tokens": r.output_tokens, "input_tokens": r.input_tokens,
                                      "cached_tokens": r.cached_tokens,
                                      "itl_s": [round(x, 6) for x in r.itl], "error": r.error or None}
                                     for r in results]})
        say(f"{label} rate={rate:g}: {m['completed']}/{m['requests']} ok, "
            f"{m['output_token_throughput']:.1f} output tok/s, TTFT p50 {m['ttft_ms']['p50'] or 0:.0f} ms, "
            f"TPOT p50 {m['tpot_ms']['p50'] or 0:.0f} ms, SLO attainment {m['slo_attainment']:.0%}, "
            f"cache hits {100 * (m['cache_hit_rate'] or 0):.0f}% of prompt tokens")
    return runs


async def bench(a, say) -> dict:
    if a.dataset:
        specs = sharegpt(a.dataset, a.num_prompts, a.seed, a.max_input_len, a.max_output_len, a.sharegpt_output_len)
    elif a.workload == "shared-prefix":
        specs = shared_prefix(a.num_prompts, a.prefix_len, a.input_len, a.output_len, a.seed, a.num_prefixes)
    elif a.workload == "multi-turn":
        specs = multi_turn(a.num_prompts, a.turns, a.input_len, a.output_len, a.seed)
    else:
        specs = synthetic(a.num_prompts, a.input_len, a.output_len, a.seed, a.prompt_format == "text")
    runs: list[dict] = []
    if not a.launch:
        driver = ClientDriver(a.frontend, a.request_timeout) if a.frontend else \
            HttpDriver(a.url, a.http_model, a.request_timeout)
        try:
            runs += await measure_target(a, driver, "external", specs, say)
        finally:
            await driver.close()
    else:
        modes = ["agg", "disagg"] if a.compare else [a.mode]
        reuses = [True, False] if a.compare_reuse else [None]
        routers = a.compare_routers or [a.router]
        for mode, reuse, router in itertools.product(modes, reuses, routers):
            opts: dict = {"num_threads": a.worker_threads}
            kv: dict = {} if a.kv_max_tokens is None else {"max_tokens": a.kv_max_tokens}
            label = mode
            if reuse is not None:
                kv["enable_block_reuse"] = reuse
                label = mode if reuse else f"{mode}-noreuse"
            if kv:
                opts["kv_cache_config"] = kv
            if a.compare_routers:
                label = f"{label}-{router}"
            say(f"starting the {label} deployment of {a.model} ...")
            dep = await asyncio.to_thread(Deployment, mode, a.model, a.api == "http", a.agg_instances,
                                          opts, a.ready_timeout, say, a.context_instances, router)
            try:
                driver = ClientDriver(dep.frontend, a.request_timeout) if a.api == "client" else \
                    HttpDriver(dep.url, a.http_model, a.request_timeout)
                try:
                    runs += await measure_target(a, driver, label, specs, say)
                finally:
                    await driver.close()
            finally:
                dep.close()
    return report(a, specs, runs)


def report(a, specs: list[Spec], runs: list[dict]) -> dict:
    targets = list(dict.fromkeys(r["target"] for r in runs))
    good = {t: goodput([r for r in runs if r["target"] == t], a.slo_attainment) for t in targets}
    out = {
        "benchmark": "throughput",
        "config": {k: v for k, v in vars(a).items()},
        "workload": {"source": a.dataset or a.workload, "requests": len(specs),
                     "mean_input_tokens": sum(s.input_len for s in specs) / len(specs),
                     "mean_output_tokens": sum(s.output_len for s in specs) / len(specs),
                     "ignore_eos": True},
        "machine": machine(),
        "slo": {"ttft_ms": a.slo_ttft_ms, "tpot_ms": a.slo_tpot_ms, "attainment": a.slo_attainment},
        "goodput_rps": good,
        "runs": runs,
    }
    out["config"]["request_rate"] = [r if math.isfinite(r) else "inf" for r in a.request_rate]
    for r in runs:
        if math.isinf(r["request_rate"]):
            r["request_rate"] = "inf"
    if a.compare:
        out["compare"] = compare(runs, good)
    if a.compare_reuse:   # prefix caching on / off, per deployment
        out["compare_reuse"] = {t: compare(runs, good, t, f"{t}-noreuse") for t in targets
                                if not t.endswith("-noreuse")}
    if a.compare_routers:   # each router / the first, per deployment
        first = a.compare_routers[0]
        out["compare_routers"] = {t: compare(runs, good, t, t[:-len(router)] + first)
                                  for t in targets for router in a.compare_routers[1:]
                                  if t.endswith(f"-{router}")}
    return out


_RATIO_KEYS = [("request_throughput", None), ("output_token_throughput", None), ("slo_attainment", None),
               ("ttft_ms", "mean"), ("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "mean"),
               ("tpot_ms", "p50"), ("tpot_ms", "p99"), ("itl_ms", "p50"), ("itl_ms", "p99"),
               ("e2e_ms", "mean"), ("e2e_ms", "p50"), ("e2e_ms", "p99")]


def compare(runs: list[dict], good: dict, num: str = "disagg", den: str = "agg") -> dict:
    """Target ``num`` / target ``den``, rate by rate (above 1 is better for throughputs and
    attainment, below 1 is better for latencies)."""
    by = {(r["target"], str(r["request_rate"])): r["metrics"] for r in runs}
    out = {}
    for (t, rate), m in by.items():
        if t != num or (den, rate) not in by:
            continue
        base = by[(den, rate)]
        ratios = {}
        for key, sub in _RATIO_KEYS:
            x = m[key][sub] if sub else m[key]
            y = base[key][sub] if sub else base[key]
            ratios[f"{key}.{sub}" if sub else key] = (x / y) if x is not None and y else None
        out[f"rate={rate}"] = ratios
    if good.get(den) and good.get(num):
        out["goodput_rps"] = good[num] / good[den]
    return out


def render(rep: dict) -> str:
    rows = []
    for r in rep["runs"]:
        m = r["metrics"]
        rows.append([r["target"], r["request_rate"], f"{m['completed']}/{m['requests']}",
                     m["request_throughput"], m["output_token_throughput"],
                     m["ttft_ms"]["mean"], m["ttft_ms"]["p50"], m["ttft_ms"]["p90"], m["ttft_ms"]["p99"],
                     m["tpot_ms"]["mean"], m["tpot_ms"]["p50"], m["tpot_ms"]["p99"],
                     m["itl_ms"]["p50"], m["itl_ms"]["p99"], m["e2e_ms"]["p50"], m["e2e_ms"]["p99"],
                     f"{100 * m['slo_attainment']:.0f}%" if m["slo_attainment"] is not None else None,
                     f"{100 * m['cache_hit_rate']:.0f}%" if m.get("cache_hit_rate") is not None else None])
    w = rep["workload"]
    slo = rep["slo"]
    finite = any(r["request_rate"] != "inf" for r in rep["runs"])
    lines = [f"throughput benchmark: {w['requests']} requests ({w['source']}, mean {w['mean_input_tokens']:.0f} "
             f"input / {w['mean_output_tokens']:.0f} output tokens, ignore_eos), api "
             f"{rep['config']['api'] if rep['config']['launch'] else ('client' if rep['config']['frontend'] else 'http')}, "
             f"concurrency cap {rep['config']['concurrency'] or 'none'}; {rep['machine']['cpus']} CPUs",
             "",
             table(["target", "rate/s", "ok", "req/s", "out tok/s", "TTFT mean", "p50", "p90", "p99",
                    "TPOT mean", "p50", "p99", "ITL p50", "p99", "E2E p50", "p99", "SLO ok", "cached"], rows),
             "(latencies in ms)", "",
             f"goodput (highest swept rate with >= {slo['attainment']:.0%} of requests within TTFT "
             f"{slo['ttft_ms']:g} ms and TPOT {slo['tpot_ms']:g} ms): "
             + ", ".join(f"{t} {g:g} req/s" if g else f"{t} none of the swept rates" if finite
                         else f"{t} n/a (sweep finite --request-rate values)"
                         for t, g in rep["goodput_rps"].items())]
    ratio_tables = [("disaggregated / aggregated", rep["compare"])] if rep.get("compare") else []
    ratio_tables += [(f"{t}: prefix caching on / off", c) for t, c in rep.get("compare_reuse", {}).items()]
    if rep.get("compare_routers"):
        first = rep["config"]["compare_routers"][0]
        ratio_tables += [(f"{t} / {first}", c) for t, c in rep["compare_routers"].items()]
    keys = ["request_throughput", "output_token_throughput", "ttft_ms.p50", "ttft_ms.p99",
            "tpot_ms.p50", "itl_ms.p50", "e2e_ms.p50", "slo_attainment"]
    for title, ratios_by_rate in ratio_tables:
        crow = [[rate] + [ratios.get(k) for k in keys] for rate, ratios in ratios_by_rate.items()
                if isinstance(ratios, dict)]
        lines += ["", f"{title} (throughput and SLO: higher is better; latency: lower is better)",
                  table(["", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "ITL p50",
                         "E2E p50", "SLO ok"], crow)]
        if "goodput_rps" in ratios_by_rate:
            lines.append(f"goodput ratio: {ratios_by_rate['goodput_rps']:.2f}")
    return "\n".join(lines)


def plot(rep: dict, path: str) -> None:
    """TTFT, TPOT, ITL and E2E distributions (CDFs), throughput and SLO attainment by rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = rep["runs"]
    targets = list(dict.fromkeys(r["target"] for r in runs))
    rates = list(dict.fromkeys(str(r["request_rate"]) for r in runs))
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    cdfs = [("ttft_s", "TTFT (ms)"), ("tpot_s", "time per output token (ms)"), ("itl_s", "inter-token latency (ms)"),
            ("e2e_s", "end-to-end latency (ms)")]
    for ax, (key, title) in zip(axes.flat, cdfs):
        for r in runs:
            if key == "itl_s":
                v = sorted(1000 * x for q in r["per_request"] if q["ok"] for x in q["itl_s"])
            else:
                v = sorted(1000 * q[key] for q in r["per_request"] if q["ok"] and q[key] is not None)
            if v:
                ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=f"{r['target']} @ {r['request_rate']}/s",
                        color=f"C{targets.index(r['target'])}",
                        ls=styles[rates.index(str(r['request_rate'])) % len(styles)])
        ax.set_title(title)
        ax.set_ylabel("share of requests" if key != "itl_s" else "share of token gaps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes.flat[4]
    labels = [f"{r['target']}\n@{r['request_rate']}/s" for r in runs]
    ax.bar(range(len(runs)), [r["metrics"]["output_token_throughput"] or 0 for r in runs],
           color=[f"C{targets.index(r['target'])}" for r in runs])
    ax.set_xticks(range(len(runs)), labels, fontsize=8)
    ax.set_title("output token throughput (tokens/s)")
    ax.grid(alpha=0.3, axis="y")
    ax = axes.flat[5]
    for t in targets:
        rr = [r for r in runs if r["target"] == t and r["request_rate"] != "inf"]
        if rr:
            ax.plot([r["request_rate"] for r in rr], [100 * r["metrics"]["slo_attainment"] for r in rr],
                    "o-", label=t, color=f"C{targets.index(t)}")
    slo = rep["slo"]
    ax.axhline(100 * slo["attainment"], color="gray", ls="--", label=f"target {slo['attainment']:.0%}")
    ax.set_ylim(-5, 105)
    ax.set_xlabel("request rate (req/s)")
    ax.set_title(f"SLO attainment (TTFT <= {slo['ttft_ms']:g} ms, TPOT <= {slo['tpot_ms']:g} ms), %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    w = rep["workload"]
    fig.suptitle(f"{rep['config'].get('model') if rep['config'].get('launch') else 'external target'}: "
                 f"{w['requests']} requests, ~{w['mean_input_tokens']:.0f} in / {w['mean_output_tokens']:.0f} "
                 f"out tokens, {rep['machine']['cpus']} CPUs")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    check_args(ap, a)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        rep = asyncio.run(bench(a, say))
    except (RuntimeError, TimeoutError, ValueError, OSError) as e:
        print(f"bench.throughput: error: {e}", file=sys.stderr)
        return 1
    write_json(a.out, rep)
    print(render(rep))
    print(f"\nJSON: {a.out}")
    if not a.no_plot:
        path = a.plot or os.path.splitext(a.out)[0] + ".png"
        try:
            plot(rep, path)
            print(f"plot: {path}")
        except ImportError:
            print("plot: skipped (matplotlib is not installed: pip install matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
