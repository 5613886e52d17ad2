"""The worker's request lifecycle: admission, KV reservation, chunked prefill, decode batches,
stop handling, cancels and the context worker's KV leases.

Pure: no sockets, no torch, no transfer package, and no clock of its own (an injected monotonic
clock). The worker loop (``workers/worker.py``) turns broker messages into calls here, runs the
engine steps this module chooses (``next_prefill``, ``next_decode``), starts the KV pulls that
``admit`` yields, and sends ``outbox`` to the broker. Every block this module allocates goes
back to the allocator when its request ends here or its lease is released; after ``drop_all``
the allocator is all free and no lease is held.

Transfer calls that must happen before blocks go back to the allocator (releasing a lease at the
source, cancelling a pull that writes into blocks) are injected callables, called in that order.
With prefix caching, what the cache stores and evicts goes to the broker as ``KvEvents`` in the
outbox, after each prefill or pull and with each heartbeat (docs/architecture.md §2, Routing).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from broker import protocol as p
from broker.kv_keys import prompt_text, text_keys, text_ties
from broker.protocol import Code, SamplingParams
from workers.sequence import CONTEXT, DECODE, FULL, Sequence

log = logging.getLogger("worker")


class RequestRejected(Exception):
    """The request cannot run here as given; the message names the field and the value."""


@dataclass
class Lease:
    """KV blocks a context worker holds for a generation worker to pull (keyed by the dispatch key)."""
    blocks: list
    expires: float


@dataclass
class PrefillChunk:
    """Prompt tokens ``start:end`` of ``seq`` to run through the model next."""
    seq: Sequence
    start: int
    end: int

    @property
    def token_ids(self) -> list:
        return self.seq.prefill_ids[self.start:self.end]

    @property
    def last(self) -> bool:
        """The prefill's last chunk."""
        return self.end == len(self.seq.prefill_ids)

    @property
    def samples(self) -> bool:
        """The last chunk of a fresh prompt: its logits give the first output token (a
        continuation's next token comes from its first decode step)."""
        return self.last and not self.seq.output_ids

    @property
    def targets(self) -> list:
        """The prompt tokens this chunk's positions score: each position's next token."""
        return self.seq.prompt_ids[self.start + 1:self.end + 1]


@dataclass
class DecodeBatch:
    """One decode step: each sequence's last token at its position, and what sampling needs."""
    seqs: list

    @property
    def tokens(self) -> list:
        return [s.output_ids[-1] for s in self.seqs]

    @property
    def positions(self) -> list:
        return [len(s.prompt_ids) + len(s.output_ids) - 1 for s in self.seqs]

    @property
    def block_tables(self) -> list:
        return [s.blocks for s in self.seqs]

    @property
    def params(self) -> list:
        return [s.params for s in self.seqs]

    @property
    def histories(self) -> list:
        """Prompt + output ids, which only the penalties read: no copy for other rows."""
        return [s.prompt_ids + s.output_ids if s.params.uses_history else () for s in self.seqs]

    @property
    def steps(self) -> list:
        return [len(s.output_ids) for s in self.seqs]

    @property
    def banned(self) -> Optional[list]:
        """Per row, the tokens its bad words ban this step; None when no row has bad words."""
        if not any(s.bad_ids for s in self.seqs):
            return None
        return [s.banned() if s.bad_ids else () for s in self.seqs]


@dataclass
class PullStart:
    """Admitted DECODE work: pull the prompt's KV from ``seq.kv_handle`` into ``blocks``."""
    seq: Sequence
    blocks: list


def _noop(_key: str) -> None:
    pass


class Scheduler:
    def __init__(self, role: str, worker_id: str, allocator, block_size: int, tok, vocab_size: int,
                 max_seq_len: int, max_batch_size: int, max_num_tokens: int, heartbeat_ms: int,
                 broker_timeout_ms: int, clock: Callable[[], float] = time.monotonic,
                 register: Optional[Callable[[str, list, int], dict]] = None,
                 release: Callable[[str], None] = _noop, cancel_pull: Callable[[str], None] = _noop):
        """``allocator``: a ``BlockAllocator`` (or anything with ``num_blocks``, ``num_free``,
        ``allocate`` and ``free``). ``tok``: the model's tokenizer (``encode``, ``decode``,
        ``apply_chat_template``, ``eos_token_ids``). ``register(key, blocks, num_tokens)``
        makes a finished prompt's KV pullable and returns its handle (context role);
        ``release(key)`` ends that at the source; ``cancel_pull(key)`` stops a pull (generation)."""
        self.role, self.worker_id = role, worker_id
        self.allocator, self.block_size = allocator, block_size
        self.tok, self.eos_ids, self.vocab_size = tok, tuple(tok.eos_token_ids), vocab_size
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.max_num_tokens = max_num_tokens
        self.heartbeat_s, self.broker_timeout_s = heartbeat_ms / 1000, broker_timeout_ms / 1000
        self.clock = clock
        self.register, self.release, self.cancel_pull = register, release, cancel_pull
        # a CachingAllocator (prefix_cache.py) when kv_cache_config.enable_block_reuse is on
        self.reuse = hasattr(allocator, "lookup")
        self.outbox: list[p.Message] = []            # messages for the broker, in order
        self.seqs: dict[str, Sequence] = {}          # by request id: every request this worker runs
        self.waiting: deque[Sequence] = deque()      # admitted, waiting for KV blocks
        self.prefilling: deque[Sequence] = deque()
        self.pulling: dict[str, Sequence] = {}       # by key
        self.running: list[Sequence] = []
        self.leases: dict[str, Lease] = {}           # by key
        self.last_broker = self.next_heartbeat = 0.0
        self.max_batch_since_heartbeat = 0
        self.draining = False      # told to every heartbeat: the broker sends no new work

    @property
    def idle(self) -> bool:
        """Nothing held here: no request in any phase and no KV lease (a drained worker may go)."""
        return not self.seqs and not self.leases

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -----------------------------------------------------------------------------------------
    # liveness

    def heard_from_broker(self) -> None:
        self.last_broker = self.clock()

    def broker_silence(self) -> Optional[float]:
        """Seconds without a word from the broker, once that passes the timeout; else None."""
        silent = self.clock() - self.last_broker
        return silent if silent > self.broker_timeout_s else None

    def heartbeat_if_due(self) -> bool:
        """Queue a Heartbeat when one is due (also between layers of a long prefill)."""
        now = self.clock()
        if now < self.next_heartbeat:
            return False
        self.next_heartbeat = now + self.heartbeat_s
        self._publish()
        self.outbox.append(p.Heartbeat(self.allocator.num_free, len(self.leases),
                                       self.max_batch_since_heartbeat, self.draining))
        self.max_batch_since_heartbeat = 0
        return True

    def poll_timeout_ms(self) -> int:
        """How long the loop may wait for the broker before the next step."""
        if self.prefilling or self.running:
            return 0
        if self.pulling:
            return 1         # pulls finish in the transfer thread: look often
        until_heartbeat = max(1, min(200, int((self.next_heartbeat - self.clock()) * 1000) + 1))
        return min(20 if self.leases else 1000, until_heartbeat)   # held leases only expire

    # -----------------------------------------------------------------------------------------
    # messages from the broker

    def on_message(self, msg: p.Message) -> None:
        if isinstance(msg, (p.Prefill, p.Generate)):
            kind = CONTEXT if isinstance(msg, p.Prefill) else FULL
            # a generation worker also runs a Generate: a continuation (with output_ids), or a
            # prompt it prefills itself (conditional disaggregation)
            roles = ("context",) if kind == CONTEXT else ("both", "generation")
            if not self._role_is(roles, msg):
                return
            try:
                seq = self._new_sequence(msg, kind)
            except RequestRejected as e:
                return self.fail(msg.request_id, msg.attempt, Code.INVALID_REQUEST, str(e))
            if kind == CONTEXT:
                seq.lease_ms = msg.lease_ms
            self._enqueue(seq)
        elif isinstance(msg, p.Decode):
            if not self._role_is(("generation",), msg):
                return
            try:
                seq = self._decode_sequence(msg)
            except RequestRejected as e:
                return self.fail(msg.request_id, msg.attempt, Code.INVALID_REQUEST, str(e))
            self._enqueue(seq)
        elif isinstance(msg, p.KvRelease):
            self.release_lease(f"{msg.request_id}#{msg.attempt}")
        elif isinstance(msg, p.CancelWork):
            seq = self.seqs.get(msg.request_id)
            if seq is not None and seq.attempt == msg.attempt:
                self._drop(seq)
            self.release_lease(f"{msg.request_id}#{msg.attempt}")

    def _role_is(self, expected: tuple, msg) -> bool:
        if self.role in expected:
            return True
        self.fail(msg.request_id, msg.attempt, Code.INTERNAL,
                  f"worker {self.worker_id} has role {self.role}, not {' or '.join(expected)}")
        return False

    def _enqueue(self, seq: Sequence) -> None:
        old = self.seqs.get(seq.request_id)
        if old is not None:      # a newer dispatch of the same request replaces the old one
            self._drop(old)
        self.seqs[seq.request_id] = seq
        self.waiting.append(seq)

    def _params(self, sampling: dict) -> SamplingParams:
        try:
            params = SamplingParams.from_dict(sampling)
        except p.ProtocolError as e:
            raise RequestRejected(str(e)) from None
        bad = [t for t, _ in params.logit_bias if t >= self.vocab_size]
        if bad:
            raise RequestRejected(f"logit_bias token id {bad[0]} is outside the vocabulary "
                                  f"[0, {self.vocab_size})")
        return params

    def _new_sequence(self, msg, kind: str) -> Sequence:
        params = self._params(msg.sampling)
        if msg.token_ids is not None:
            ids = list(msg.token_ids)
            self._check_vocab("token_ids", ids)
        else:
            self._check_prompt_chars(msg)
            if msg.messages is not None:
                ids = self.tok.encode(self.tok.apply_chat_template(msg.messages))
            else:
                ids = self.tok.encode(msg.prompt)
        if not ids:
            raise RequestRejected("the prompt encodes to no tokens")
        k = params.prompt_logprobs
        if k is not None and len(ids) * (k + 1) > p.MAX_PROMPT_LOGPROBS:
            raise RequestRejected(f"prompt_logprobs={k} with a prompt of {len(ids)} tokens: at most "
                                  f"{p.MAX_PROMPT_LOGPROBS} prompt tokens x (prompt_logprobs + 1)")
        seq = Sequence(msg.request_id, msg.attempt, kind, ids, params, self._max_new(ids, params),
                       bad_ids=self._bad_ids(params))
        if self.reuse:
            seq.prompt_text = prompt_text(msg.prompt, msg.messages)
        out = getattr(msg, "output_ids", None)
        if out:
            self._check_vocab("output_ids", out)
            try:
                seq.continue_after(list(out), msg.output_chars, self.tok, self.eos_ids)
            except ValueError as e:
                raise RequestRejected(str(e)) from None
            if seq.finish_reason:
                raise RequestRejected(f"invalid output_ids: the request had already ended "
                                      f"({seq.finish_reason}) within its {len(out)} output tokens")
        return seq

    def _bad_ids(self, params: SamplingParams) -> tuple:
        """Each bad word as token ids, encoded alone as TensorRT-LLM's BLS encodes it (no BOS)."""
        out = []
        for word in params.bad_words:
            ids = self.tok.encode(word)
            if getattr(self.tok, "add_bos", False) and ids[:1] == [self.tok.bos_token_id]:
                ids = ids[1:]
            if ids:
                out.append(tuple(ids))
        return tuple(out)

    def _check_vocab(self, name: str, ids) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestRejected(f"invalid {name}: {bad[0]} is outside the vocabulary "
                                  f"[0, {self.vocab_size})")

    def _check_prompt_chars(self, msg) -> None:
        """Refuse a text prompt too long to fit the context before encoding it: tokenising a few
        MB costs seconds on the worker's loop (its heartbeat with it). A token stands for at most
        ``max_token_chars`` characters, so more than ``max_seq_len`` times that cannot fit."""
        limit = self.max_seq_len * max(1, getattr(self.tok, "max_token_chars", 1))
        if msg.prompt is not None:
            n, what = len(msg.prompt), "prompt"
        else:
            n, what = sum(len(m.get("content") or "") for m in msg.messages), "messages' content"
        if n > limit:
            raise RequestRejected(f"{what} of {n} characters cannot fit the model's context "
                                  f"(max_seq_len {self.max_seq_len} tokens, at most {limit} "
                                  f"characters)")

    def _decode_sequence(self, msg: p.Decode) -> Sequence:
        params = self._params(msg.sampling)
        ids = list(msg.prompt_token_ids)
        seq = Sequence(msg.request_id, msg.attempt, DECODE, ids, params, self._max_new(ids, params),
                       output_ids=[msg.first_token], kv_handle=dict(msg.kv_handle), bad_ids=self._bad_ids(params))
        seq.emitted_chars = len(msg.first_text)
        seq.text = msg.first_text
        if self.reuse:
            seq.prompt_text = prompt_text(msg.prompt, msg.messages)
        return seq

    def _max_new(self, ids: list, params: SamplingParams) -> int:
        n = len(ids)
        if n >= self.max_seq_len:
            raise RequestRejected(f"prompt is {n} tokens; the model's context (max_seq_len) is "
                                  f"{self.max_seq_len} tokens, leaving no room for output")
        capacity = self.allocator.num_blocks * self.block_size
        if n + 1 > capacity:
            raise RequestRejected(f"prompt is {n} tokens; this worker's KV cache holds {capacity} "
                                  f"tokens (kv_cache_config.max_tokens)")
        room = self.max_seq_len - n
        if params.max_tokens is None:
            want = min(params.default_max_tokens, room)
        elif params.max_tokens > room:
            # OpenAI's and vLLM's rule: refused at once, not clipped into a run the caller did not ask for
            raise RequestRejected(f"max_tokens={params.max_tokens} with a prompt of {n} tokens needs "
                                  f"{n + params.max_tokens} tokens, beyond the model's context "
                                  f"(max_seq_len) of {self.max_seq_len}: ask for at most {room}")
        else:
            want = params.max_tokens
        return max(1, min(want, capacity - n))

    def fail(self, rid: str, attempt: int, code: str, message: str, retryable: bool = False) -> None:
        log.info("request %s failed: %s %s", rid, code, message)
        self.outbox.append(p.Failed(rid, attempt, code, message, retryable))

    # -----------------------------------------------------------------------------------------
    # admission and transfers

    def admit(self) -> Iterator[PullStart]:
        """Reserve KV blocks for waiting requests, first come first served; a request that does
        not fit waits (and everything behind it) until blocks are freed. Yields the KV pulls to
        start; the caller reports a pull that cannot start with ``pull_failed`` before the next
        item, so its blocks serve the requests behind it."""
        while self.waiting:
            seq = self.waiting[0]
            need = self.blocks_for(seq.reserve_tokens)
            hit: list = []
            free = self.allocator.num_free
            if self.reuse and seq.kind != DECODE and not seq.scores_prompt:
                # at least the last prompt token is computed: its logits give the first token
                hit = self.allocator.lookup(seq.prompt_ids, len(seq.prompt_ids) - 1)
                free -= self.allocator.idle_among(hit)
            if need - len(hit) > free:
                return                       # FIFO: wait until blocks are freed
            self.waiting.popleft()
            if hit:
                self.allocator.acquire(hit)
            seq.blocks = hit + self.allocator.allocate(need - len(hit))
            seq.num_cached = seq.cached_tokens = len(hit) * self.block_size
            if seq.kind == DECODE:
                self.pulling[seq.key] = seq
                yield PullStart(seq, seq.blocks[:self.blocks_for(len(seq.prompt_ids))])
            else:
                seq.t_prefill_start = self.clock()
                self.prefilling.append(seq)

    def pull_done(self, key: str, seconds: float, nbytes: int) -> None:
        seq = self.pulling.pop(key, None)
        if seq is not None:
            if self.reuse:     # the pulled prompt blocks serve later prompts too
                self._stored(seq)
            self.outbox.append(p.KvPulled(seq.request_id, seq.attempt, seconds, nbytes))
            self.running.append(seq)

    def pull_failed(self, key: str, code: str, message: str, retryable: bool = False) -> None:
        seq = self.pulling.pop(key, None)
        if seq is not None:
            self._drop(seq)
            self.fail(seq.request_id, seq.attempt, code, message, retryable)

    def expire_leases(self) -> None:
        now = self.clock()
        for key in [k for k, lease in self.leases.items() if now >= lease.expires]:
            log.warning("KV lease %s expired without a release; freeing its blocks", key)
            self.release_lease(key)

    def release_lease(self, key: str) -> None:
        lease = self.leases.pop(key, None)
        if lease is None:
            return
        self.release(key)
        self.allocator.free(lease.blocks)

    # -----------------------------------------------------------------------------------------
    # compute

    def next_prefill(self) -> Optional[PrefillChunk]:
        """The next chunk of the oldest prompt in prefill: at most ``max_num_tokens`` tokens, so
        heartbeats and decode steps run between the chunks of a long prompt."""
        if not self.prefilling:
            return None
        seq = self.prefilling[0]
        limit = min(self.max_num_tokens, 512) if seq.scores_prompt else self.max_num_tokens
        end = min(len(seq.prefill_ids), seq.num_cached + limit)   # every position's logits: bounded
        return PrefillChunk(seq, seq.num_cached, end)

    def prefilled(self, chunk: PrefillChunk) -> None:
        """The chunk's KV is in the blocks; after the last, ``first_token`` must follow (a
        continuation goes straight to decoding instead)."""
        seq = chunk.seq
        seq.num_cached = chunk.end
        if chunk.last:
            self.prefilling.popleft()
            seq.prefill_s = self.clock() - seq.t_prefill_start
            if self.reuse:
                self._stored(seq)
            if not chunk.samples:
                self.running.append(seq)

    def prompt_scored(self, chunk: PrefillChunk, entries: list) -> None:
        """``sampler.prompt_logprobs`` of ``chunk.targets`` (a chunk of a ``seq.scores_prompt``
        request): kept for the message with token 0."""
        seq = chunk.seq
        if chunk.start == 0:
            first = seq.prompt_ids[0]
            seq.prompt_logprobs = [p.Logprobs(p.TokenLogprob(first, 0.0, self.tok.token_bytes(first)))]
        seq.prompt_logprobs.extend(self._logprobs(t, e)[0] for t, e in zip(chunk.targets, entries))

    def _stored(self, seq: Sequence) -> None:
        """The prompt's KV is in its blocks: cache its full blocks, tie its text keys to them
        (``broker/kv_keys.py``) and publish what changed to the broker."""
        al, n = self.allocator, len(seq.prompt_ids)
        al.store(seq.blocks, seq.prompt_ids)
        if seq.prompt_text is not None:
            text, chat = seq.prompt_text
            keys = text_keys(text, chat)
            ties = text_ties(len(keys), len(text), n, self.block_size, n // self.block_size)
            al.tie(keys[:len(ties)], [seq.blocks[b] for b in ties])
        self._publish()

    def _publish(self) -> None:
        """KV events: the cached-block keys stored and evicted since the last ones."""
        if self.reuse:
            stored, removed = self.allocator.take_events()
            if stored or removed:
                self.outbox.extend(p.KvEvents.of(stored, removed))

    def kv_resync(self) -> None:
        """Publish every cached key anew, the broker to forget any other (after registering)."""
        if self.reuse:
            self.outbox.extend(p.KvEvents.of(self.allocator.keys(), clear=True))

    def first_token(self, seq: Sequence, token: int, logprobs: Optional[tuple] = None) -> None:
        """``logprobs``: ``sampler.token_logprobs``'s entry for it, when the request asked."""
        text = seq.accept(token, self.tok, self.eos_ids)
        lps = self._logprobs(token, logprobs)
        if seq.kind == FULL:
            if seq.finish_reason:
                self._finish(seq, 0, [token], text, lps)
            else:
                self.outbox.append(p.Tokens(seq.request_id, 0, [token], text, seq.attempt, len(seq.prompt_ids),
                                            logprobs=lps, prompt_logprobs=seq.prompt_logprobs))
                self.running.append(seq)
            return
        # context role: hand the KV over, hold the blocks until released
        del self.seqs[seq.request_id]
        if seq.finish_reason:
            self.allocator.free(seq.blocks)
            handle = {}
        else:
            handle = self.register(seq.key, seq.blocks, len(seq.prompt_ids))
            ttl = 2 * seq.lease_ms / 1000 + 5     # the broker's lease rules; this is the safety net
            self.leases[seq.key] = Lease(seq.blocks, self.clock() + ttl)
        seq.blocks = []          # the lease (or the allocator) has them now
        self.outbox.append(p.ContextDone(seq.request_id, seq.attempt, token, text, seq.prompt_ids,
                                         handle, seq.finish_reason, seq.prefill_s, seq.cached_tokens,
                                         logprobs=lps, prompt_logprobs=seq.prompt_logprobs))

    def next_decode(self) -> Optional[DecodeBatch]:
        """Every running request, oldest first, up to ``max_batch_size``, in one step."""
        if not self.running:
            return None
        batch = self.running[:self.max_batch_size]
        self.max_batch_since_heartbeat = max(self.max_batch_since_heartbeat, len(batch))
        return DecodeBatch(batch)

    def decoded(self, batch: DecodeBatch, tokens: list, logprobs: Optional[list] = None) -> None:
        """``logprobs``: ``sampler.token_logprobs`` of the step (None when no row asked)."""
        for i, (seq, token) in enumerate(zip(batch.seqs, tokens)):
            text = seq.accept(token, self.tok, self.eos_ids)
            index = len(seq.output_ids) - 1
            lps = self._logprobs(token, logprobs[i]) if logprobs else None
            if seq.finish_reason:
                self._finish(seq, index, [token], text, lps)
            else:
                self.outbox.append(p.Tokens(seq.request_id, index, [token], text, seq.attempt, logprobs=lps))

    def _logprobs(self, token: int, entry: Optional[tuple]) -> Optional[list]:
        """The wire form of one token's ``sampler.token_logprobs`` entry (with each token's bytes)."""
        if entry is None:
            return None
        piece = self.tok.token_bytes
        top = [p.TokenLogprob(t, lp, piece(t)) for t, lp in entry[1]]
        return [p.Logprobs(p.TokenLogprob(token, entry[0], piece(token)), top)]

    def _finish(self, seq: Sequence, index: int, token_ids: list, text: str,
                logprobs: Optional[list] = None) -> None:
        """The request is done here; its last tokens ride in the Finished message."""
        self.outbox.append(p.Finished(seq.request_id, seq.attempt, seq.finish_reason,
                                      len(seq.prompt_ids), seq.prefill_s, index, token_ids, text,
                                      seq.cached_tokens, logprobs=logprobs,
                                      prompt_logprobs=seq.prompt_logprobs if index == 0 else None))
        self._drop(seq)

    # -----------------------------------------------------------------------------------------
    # cleanup

    def _drop(self, seq: Sequence) -> None:
        """Forget a request and free everything it holds here (idempotent)."""
        if self.seqs.get(seq.request_id) is seq:
            del self.seqs[seq.request_id]
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if self.pulling.pop(seq.key, None) is not None:
            self.cancel_pull(seq.key)     # before its blocks can be handed to anyone else
        if seq.blocks:
            self.allocator.free(seq.blocks)
            seq.blocks = []

    def drop_all(self) -> None:
        """Forget every request and release every lease (reconnect or shutdown)."""
        for seq in list(self.seqs.values()):
            self._drop(seq)
        for key in list(self.leases):
            self.release_lease(key)
