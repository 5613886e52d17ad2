"""Worker selection by model: which registered workers can serve a model, which one takes a
request's next phase (each role's router, ``broker/routers.py``, with what the broker knows of
the workers' prefix caches, ``broker/kv_index.py``), whether a generation worker prefills a
request itself (conditional disaggregation), and which model a request runs on. Plus the
per-model request queues.

Pure: it reads the broker's worker and request records (``broker/records.py``) and nothing
else; no I/O, no clock. ``broker/state.py`` owns every decision about requests and calls these.

Models (docs/architecture.md §2): every worker serves the one model it announced in
``Ready.model`` (its ``--model`` spec, or its ``--served-model-name``). A request naming a model
runs only on workers of that model, in every phase: its prefill, its decode (the KV of a context
worker goes only to a generation worker of the same model) and any continuation. A request
naming none runs on the only model up or, with several up, on ``broker.default_model`` when that
one is up, else on the model of the earliest registered worker still up.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Optional

from broker import protocol as p
from broker.config import Routing
from broker.kv_index import KvIndex
from broker.records import Request, Worker
from broker.routers import make_router


_NONE: frozenset = frozenset()


class Pool:
    """The registered workers (the broker's dict, shared, not copied) seen by model."""

    def __init__(self, workers: dict[bytes, Worker], routing: Routing = Routing(),
                 requests: Optional[dict] = None, clock: Callable[[], float] = lambda: 0.0):
        self.workers = workers
        self._roles: Optional[dict[str, frozenset]] = None   # model -> roles up (cached)
        self.minimum: dict = {}    # role -> workers needed up before a request is accepted (short_of)
        self.routing = routing
        self.index = KvIndex(clock)     # the clock only rate-limits its warnings
        get = (requests if requests is not None else {}).get
        ctx = make_router(routing.context, self.index, get)
        self.routers = {"context": ctx, "both": ctx,     # `both` workers take the prefill too
                        "generation": make_router(routing.generation, self.index, get)}
        # KV events matter (and a request's keys are computed) only for these; a generation
        # worker's text keys only where its router or conditional disaggregation reads them
        local = routing.max_local_prefill_length is not None
        self.uses_kv = any(r.uses_kv for r in self.routers.values()) or local
        self.gen_text = self.routers["generation"].uses_kv or local

    def changed(self) -> None:
        """A worker came or went: forget the cached roles."""
        self._roles = None

    def _by_model(self) -> dict[str, frozenset]:
        # asked for every request dispatched, changed only when a worker comes or goes
        if self._roles is None:
            roles: dict[str, set] = {}
            for w in self.workers.values():          # registration order
                roles.setdefault(w.model, set()).add(w.role)
            self._roles = {m: frozenset(r) for m, r in roles.items()}
        return self._roles

    def models(self) -> list[str]:
        """The models of the registered workers, in the order they first registered."""
        return list(self._by_model())

    def roles(self, model: str) -> frozenset:
        return (self._roles if self._roles is not None else self._by_model()).get(model, _NONE)

    def prefill_role(self, model: str) -> Optional[str]:
        """The role that takes this model's new requests: "context" (the disaggregated path,
        when context and generation workers are up), else "both", or None: nobody can serve it."""
        roles = self.roles(model)
        if "context" in roles and "generation" in roles:
            return "context"
        return "both" if "both" in roles else None

    def resolve(self, name: Optional[str], default: str = "") -> Optional[str]:
        """The model a request runs on (module docstring), or None: no worker is up, or none
        serves the model it names."""
        models = self._by_model()
        if name:
            return name if name in models else None
        if not models:
            return None
        return default if default in models else next(iter(models))

    def admit(self, name: Optional[str], default: str = "") -> tuple[Optional[str], Optional[tuple]]:
        """A new request naming model ``name``: (the model it runs on, None), or (None, why it is
        refused now: (code, text, retryable))."""
        model = self.resolve(name, default)
        if model is None and self.workers and name:
            return None, (p.Code.UNKNOWN_MODEL, self.unknown_model_text(name), False)
        if model is None or self.prefill_role(model) is None:
            return None, (p.Code.NO_WORKERS, self.no_worker_text(model or name), True)
        short = self.minimum and self.short_of()         # TensorRT-LLM's: refused until ready
        return (None, (p.Code.NO_WORKERS, short, True)) if short else (model, None)

    def unknown_model_text(self, name: str) -> str:
        return (f"model {name!r} is not served here; available models: "
                f"{', '.join(self.models()) or 'none (no worker registered)'}")

    def no_worker_text(self, model: Optional[str]) -> str:
        roles = sorted(self.roles(model)) if model else []
        return ("no worker can serve this request: need a 'both' worker, or a 'context' and a "
                f"'generation' worker; registered roles: {', '.join(roles) or 'none'}"
                + (f" (model {model!r})" if model else ""))

    def pick(self, role: str, model: str, req: Optional[Request] = None) -> Optional[Worker]:
        """The worker of this role and model with a free slot that the role's router picks for
        ``req``, or None: none has a free slot."""
        workers = [w for w in self.workers.values() if w.role == role and w.model == model]
        return self.routers[role].pick(workers, req)

    def local_prefill(self, req: Request) -> Optional[Worker]:
        """Conditional disaggregation: the generation worker that prefills this request itself,
        skipping the context phase, because the part of its prompt that worker's prefix cache
        lacks is at most ``max_local_prefill_length`` tokens; else None."""
        limit = self.routing.max_local_prefill_length
        w = self.pick("generation", req.model, req) if limit is not None else None
        if w is None or self.index.prompt_tokens(req) - self.index.matched_tokens(w, req) > limit:
            return None
        return w

    def kv_events(self, w: Worker, msg: p.KvEvents, out: list) -> None:
        """A worker's KV events (a ``BrokerState`` handler), kept where a router reads them."""
        if self.uses_kv:
            self.index.apply(w, msg)

    def text_of(self, req: Request) -> tuple:
        """The (prompt, messages) a Decode carries so that the generation worker publishes the
        text keys of what it pulls: only where routing reads them."""
        s = req.submit
        text = s.prompt is not None or s.messages is not None     # as kv_keys.prompt_text, unbuilt
        return (s.prompt, s.messages) if self.gen_text and text else (None, None)

    def short_of(self) -> str:
        """Why the workers up fall short of ``minimum`` (role -> count: TensorRT-LLM's
        ``disagg_cluster.minimal_instances``), or "" when they meet it. Draining workers do not
        count; a ``both`` worker counts for either role."""
        up = {"context": 0, "generation": 0}
        for w in self.workers.values():
            if not w.draining:
                for role in up:
                    up[role] += w.does(role)
        short = [f"{role} workers up {up[role]}, need {n}" for role, n in self.minimum.items() if up.get(role, 0) < n]
        return f"the cluster is not ready (disagg_cluster.minimal_instances): {'; '.join(short)}" if short else ""


class Queues(dict):
    """FIFO queues of request keys, one per model (model -> deque): a model whose workers are
    all busy keeps its requests waiting without holding up another model's (no head-of-line
    blocking across models). Whoever empties a queue deletes it, so the dict is true exactly
    while a request waits, and holds at most a queue per model with requests waiting (each a
    model up when the request was accepted)."""

    def __missing__(self, model: str) -> deque:
        q = self[model] = deque()
        return q

    def append(self, model: str, key: str) -> None:
        self[model].append(key)

    def appendleft(self, model: str, key: str) -> None:
        self[model].appendleft(key)

    def waiting(self) -> int:
        """The requests waiting, over every model."""
        return sum(map(len, self.values()))
