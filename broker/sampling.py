"""Sampling parameters (``SamplingParams``) and their validation, one set of rules for the
client, the broker and the worker alike. Part of the protocol: import it from
``broker/protocol.py``, which re-exports it (docs/architecture.md §3)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from broker.wire import ProtocolError, _short


def _bad_param(name: str, value: Any, expected: str) -> ProtocolError:
    return ProtocolError(f"invalid sampling parameter {name}={_short(value)}: expected {expected}")


def _is_int(v: Any) -> bool:
    return type(v) is int or (isinstance(v, int) and not isinstance(v, bool))


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: Optional[int] = None  # a request that cannot fit its prompt plus this is refused
    default_max_tokens: int = 64      # when max_tokens is absent: this, clipped to the context
    temperature: float = 0.0          # 0 means greedy
    top_k: int = 0                    # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0                # 0 means off; else keep tokens >= min_p * the most likely's
    seed: Optional[int] = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0     # OpenAI's: minus this for every token already in the output
    frequency_penalty: float = 0.0    # OpenAI's: minus this times the token's count in the output
    min_tokens: int = 0               # no EOS, stop token or stop string before this many tokens
    logit_bias: tuple = ()            # (token id, bias in [-100, 100]) pairs added to the logits
    stop: tuple = ()                  # stop strings
    stop_token_ids: tuple = ()
    ignore_eos: bool = False
    bad_words: tuple = ()             # words never to complete: the worker tokenizes each and bans
                                      # its last token where the rest ends the sequence (TensorRT-LLM's)
    # the sampled token's log-probability and this many most likely alternatives (OpenAI's
    # bound: 20), of the model's own distribution (the raw logits' log-softmax, before
    # penalties, bias and temperature: vLLM's default); None: none
    logprobs: Optional[int] = None
    # the same for each prompt token (its log-probability given the tokens before it; the first
    # has none): vLLM's prompt_logprobs, for OpenAI's echo. The prefix cache is not used for it
    prompt_logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        bad, is_int, is_num = _bad_param, _is_int, _is_num
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "an integer >= 1 or null")
        if not is_int(self.default_max_tokens) or self.default_max_tokens < 1:
            raise bad("default_max_tokens", self.default_max_tokens, "an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "a number >= 0")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", self.top_k, "an integer >= 0 (0 turns it off)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "a number in (0, 1]")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "a number in [0, 1] (0 turns it off)")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", self.seed, "an integer in [0, 2**63) or null")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "a number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                raise bad(name, v, "a number in [-2, 2]")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= MAX_MIN_TOKENS:
            raise bad("min_tokens", self.min_tokens, f"an integer in [0, {MAX_MIN_TOKENS}]")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", self.stop, "a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(is_int(t) and t >= 0 for t in ids):
            raise bad("stop_token_ids", self.stop_token_ids, "a list of token ids >= 0")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", self.ignore_eos, "true or false")
        words = self.bad_words
        if not isinstance(words, (list, tuple)) or len(words) > MAX_BAD_WORDS or not all(
                isinstance(w, str) and 0 < len(w) <= MAX_BAD_WORD_CHARS for w in words):
            raise bad("bad_words", self.bad_words, f"a list of at most {MAX_BAD_WORDS} non-empty strings of at "
                                                   f"most {MAX_BAD_WORD_CHARS} characters")
        object.__setattr__(self, "bad_words", tuple(words))
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= MAX_TOP_LOGPROBS):
                raise bad(name, v, f"an integer in [0, {MAX_TOP_LOGPROBS}] or null")

    @property
    def uses_history(self) -> bool:
        """Whether sampling reads the prompt and output so far (the penalties)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty or self.frequency_penalty)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SamplingParams":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ProtocolError(f"invalid sampling parameters {_short(d)}: expected a map")
        names = _SAMPLING_NAMES
        if not names.issuperset(d):
            unknown = sorted(set(d) - names)
            raise ProtocolError(f"unknown sampling parameter {unknown[0]!r}; known: {', '.join(sorted(names))}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        d["logit_bias"] = [list(pair) for pair in self.logit_bias]
        d["bad_words"] = list(self.bad_words)
        return d


MAX_MIN_TOKENS = 1 << 20
MAX_BAD_WORDS, MAX_BAD_WORD_CHARS = 16, 128
MAX_TOP_LOGPROBS = 20       # alternatives per token: OpenAI's bound
MAX_LOGIT_BIAS = 1024       # entries; OpenAI takes 300


def _logit_bias(v: Any) -> tuple:
    """``{token id: bias}`` (JSON's string keys too) or ``[[id, bias], ...]`` as sorted pairs."""
    pairs = list(v.items()) if isinstance(v, dict) else v
    if not isinstance(pairs, (list, tuple)) or len(pairs) > MAX_LOGIT_BIAS:
        raise _bad_param("logit_bias", v, f"a map of at most {MAX_LOGIT_BIAS} token ids to biases")
    out = {}
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise _bad_param("logit_bias", v, "token id -> bias pairs")
        tid, bias = pair
        if isinstance(tid, str) and tid.isdigit() and len(tid) < 12:
            tid = int(tid)
        if not _is_int(tid) or not 0 <= tid < 2**32:
            raise _bad_param("logit_bias", tid, "token ids (integers >= 0) as keys")
        if not _is_num(bias) or not -100 <= bias <= 100:
            raise _bad_param(f"logit_bias[{tid}]", bias, "a number in [-100, 100]")
        out[tid] = float(bias)
    return tuple(sorted(out.items()))


_SAMPLING_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))

# Sampling maps seen valid, keyed by (name, exact type, value) triples: clients send the same few
# maps again and again, and building SamplingParams to validate one costs the broker more than
# all the rest of decoding a Submit. The exact type is part of the key because 1 == 1.0 == True.
# A map with an unhashable value (a stop list) is checked every time; the table stays small.
_VALID_SAMPLING: dict = {}
_VALID_SAMPLING_MAX = 1024


def check_sampling(d: Optional[dict]) -> None:
    """Raise ProtocolError unless ``d`` is a valid sampling map (as SamplingParams.from_dict)."""
    if type(d) is dict:
        try:
            key = tuple(zip(d, map(type, d.values()), d.values()))
            if key in _VALID_SAMPLING:
                return
        except TypeError:        # an unhashable value
            key = None
    else:
        key = None
    SamplingParams.from_dict(d)
    if key is not None and len(_VALID_SAMPLING) < _VALID_SAMPLING_MAX:
        _VALID_SAMPLING[key] = True
