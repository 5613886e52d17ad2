"""The inputs and outputs of the Triton TensorRT-LLM backend's ``tensorrt_llm_bls`` (and
``ensemble``) models, and how a request on them becomes one of ours.

The names, datatypes and defaults follow the backend's model configs (``config.pbtxt``) and its
BLS: ``text_input`` and ``max_tokens`` are required; with no ``top_k`` and no ``top_p`` (or
``top_k`` 1, or ``temperature`` 0) decoding is greedy, as TensorRT-LLM decodes; ``stop_words``
and ``bad_words`` are comma-separated lists (CSV quoting allowed, empty words dropped, so ``""``
means none; a bad word's last token is never sampled where its other tokens end the sequence, as
TensorRT-LLM bans them); ``end_id`` replaces the model's end token; ``text_output`` holds the prompt and the
answer unless ``exclude_input_in_output`` (streamed responses never hold the prompt). A stop word
is left out of ``text_output`` (TensorRT-LLM keeps it). Inputs this engine cannot honour are
accepted only at their neutral values and otherwise refused, naming the input and its value.
With ``return_log_probs``, ``output_log_probs`` holds each output token's log-probability (of
the model's distribution, as ``SamplingParams.logprobs`` computes them) and ``cum_log_probs``
their sum (a streamed response: the sum so far); without it both are zeros, as the backend
returns them.

Pure: no I/O; errors are ``HttpError`` (400) naming the input.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from broker.protocol import MAX_BAD_WORD_CHARS, MAX_BAD_WORDS

from .kserve import Tensor
from .openai_models import HttpError

# name -> (datatype, dims without the batch dimension, required)
INPUTS = {
    "text_input": ("BYTES", [1], True),
    "max_tokens": ("INT32", [1], True),
    "bad_words": ("BYTES", [-1], False),
    "stop_words": ("BYTES", [-1], False),
    "end_id": ("INT32", [1], False),
    "pad_id": ("INT32", [1], False),
    "top_k": ("INT32", [1], False),
    "top_p": ("FP32", [1], False),
    "temperature": ("FP32", [1], False),
    "length_penalty": ("FP32", [1], False),
    "repetition_penalty": ("FP32", [1], False),
    "min_length": ("INT32", [1], False),
    "presence_penalty": ("FP32", [1], False),
    "frequency_penalty": ("FP32", [1], False),
    "random_seed": ("UINT64", [1], False),
    "return_log_probs": ("BOOL", [1], False),
    "return_context_logits": ("BOOL", [1], False),
    "return_generation_logits": ("BOOL", [1], False),
    "beam_width": ("INT32", [1], False),
    "stream": ("BOOL", [1], False),
    "exclude_input_in_output": ("BOOL", [1], False),
}
OUTPUTS = {"text_output": ("BYTES", [-1]), "cum_log_probs": ("FP32", [-1]), "output_log_probs": ("FP32", [-1, -1])}
# Triton model names that stand for the served model, and the platform each reports
ALIASES = {"ensemble": "ensemble", "tensorrt_llm_bls": "python", "disaggregated_serving_bls": "python"}
VERSION = "1"
MAX_WORDS = MAX_BAD_WORDS       # in stop_words, and in bad_words
_RANGES = {"INT32": (-2**31, 2**31 - 1), "UINT64": (0, 2**64 - 1)}
# inputs accepted only at their neutral value: name -> (is it neutral?, what turns it off, why)
_NEUTRAL = {
    "beam_width": (lambda v: v == 1, "1", ": this server decodes one beam"),
    "return_context_logits": (lambda v: v is False, "false", ": the engine returns no logits"),
    "return_generation_logits": (lambda v: v is False, "false", ": the engine returns no logits"),
}


def _bad(name: str, value: Any, expected: str) -> HttpError:
    return HttpError(400, f"invalid {name}={json.dumps(value)[:60]}: expected {expected}", name, "invalid_value")


@dataclass
class BlsRequest:
    """One BLS request as ours: the prompt, the ``AsyncClient`` sampling arguments, and how to answer."""
    prompt: str
    sampling: dict
    stream: bool = False
    exclude_input: bool = False

    def inputs(self, markers: Optional[tuple]) -> dict:
        """The ``AsyncClient`` prompt arguments: the text as it is (``markers`` None, or the text
        holds one of them: it is templated already), else as the user's one message, which the
        worker renders with its model's chat template."""
        if markers is None or any(m in self.prompt for m in markers):
            return {"prompt": self.prompt}
        return {"messages": [{"role": "user", "content": self.prompt}]}

    def outputs(self, text: str, log_probs: list, streamed: bool = False, cum: float = 0.0) -> dict:
        """The BLS outputs for ``text`` (the answer, or one streamed piece of it) and its tokens'
        ``log_probs`` (``token_log_probs``); ``cum``: the sum of those streamed before it."""
        shown = text if streamed or self.exclude_input else self.prompt + text
        return {"text_output": shown, "cum_log_probs": cum + sum(log_probs), "output_log_probs": log_probs}


def token_log_probs(out) -> list:
    """Each token's log-probability of a ``client.Chunk`` or ``client.Completion`` (zeros when
    the request did not ask: no ``return_log_probs``)."""
    if out is None:
        return []
    if out.logprobs is None:
        return [0.0] * len(out.token_ids)
    return [lp.token.logprob for lp in out.logprobs]


def _element(name: str, datatype: str, v: Any) -> Any:
    """``v`` as the value of input ``name``: the input's kind (text, bool, integer, number), in range."""
    want = INPUTS[name][0]
    kind_ok = (isinstance(v, str) if want == "BYTES" else isinstance(v, bool) if want == "BOOL"
               else isinstance(v, int) and not isinstance(v, bool) if want in _RANGES
               else isinstance(v, (int, float)) and not isinstance(v, bool))
    if not kind_ok or (datatype == "BOOL") != (want == "BOOL") or (datatype == "BYTES") != (want == "BYTES"):
        raise _bad(name, v, f"{'a string' if want == 'BYTES' else 'true or false' if want == 'BOOL' else want}"
                            f" (datatype {want})")
    lo, hi = _RANGES.get(want, (None, None))
    if lo is not None and not lo <= v <= hi:
        raise _bad(name, v, f"an integer in [{lo}, {hi}] (datatype {want})")
    if want == "FP32" and not math.isfinite(v):
        raise _bad(name, v, "a finite number")
    return v


def json_values(body: dict) -> dict:
    """The inputs of a ``generate`` body (one request: each value a scalar, or a list for a word list)."""
    params = body.get("parameters")
    if params not in (None, {}):
        raise HttpError(400, f"parameters={json.dumps(params)[:60]} is not supported: send the BLS inputs as "
                             "top-level fields", "parameters", "unsupported_value")
    values = {}
    for k, v in body.items():
        if k in ("id", "parameters"):
            continue
        if k not in INPUTS:
            raise HttpError(400, f"unknown input {k!r}; supported: {', '.join(INPUTS)}", k, "unknown_field")
        items = v if isinstance(v, list) else [v]
        values[k] = [_element(k, INPUTS[k][0] if not isinstance(x, bool) else "BOOL", x) for x in items]
    return values


def tensor_rows(tensors: list[Tensor], max_batch: int) -> list[dict]:
    """The inputs of an ``infer`` request, one dict per batch row (the first dimension is the batch)."""
    if not tensors:
        raise HttpError(400, "missing required input 'text_input'", "text_input", "missing_field")
    rows: list[dict] = []
    batch = None
    for t in tensors:
        if t.name not in INPUTS:
            raise HttpError(400, f"unknown input {t.name!r}; supported: {', '.join(INPUTS)}", t.name, "unknown_field")
        b = t.shape[0] if t.shape else 1
        if batch is None:
            batch = b
            if not 1 <= b <= max_batch:
                raise HttpError(400, f"input {t.name!r} has a batch of {b} (its first dimension); expected 1 to "
                                     f"{max_batch}", t.name, "invalid_value")
            rows = [{} for _ in range(b)]
        elif b != batch:
            raise HttpError(400, f"input {t.name!r} has a batch of {b} but {tensors[0].name!r} has {batch}: "
                                 "every input's first dimension is the batch", t.name, "invalid_value")
        per = len(t.data) // b if b else 0
        for i, row in enumerate(rows):
            row[t.name] = [_element(t.name, t.datatype, x) for x in t.data[i * per:(i + 1) * per]]
    return rows


def _words(name: str, items: list) -> list:
    words = [w for item in items for w in next(csv.reader([item]), []) if w]
    if len(words) > MAX_WORDS:
        raise HttpError(400, f"{name} holds {len(words)} words; at most {MAX_WORDS} are supported", name,
                        "invalid_value")
    return words


def bls_request(values: dict) -> BlsRequest:
    """The request the BLS inputs in ``values`` (name -> list of elements) ask for, or a 400."""
    for name, (_, _, required) in INPUTS.items():
        if required and not values.get(name):
            raise HttpError(400, f"missing required input {name!r}", name, "missing_field")

    def one(name: str, default: Any = None) -> Any:
        items = values.get(name)
        if items is None:
            return default
        if len(items) != 1:
            raise _bad(name, items, "one value")
        return items[0]

    prompt = one("text_input")
    if not prompt:
        raise _bad("text_input", prompt, "a non-empty string")
    for name, (neutral, off, why) in _NEUTRAL.items():
        v = one(name)
        if v is not None and not neutral(v):
            raise HttpError(400, f"{name}={json.dumps(v)} is not supported by this server ({off} turns it off)"
                                 f"{why}", name, "unsupported_value")
    max_tokens, top_k, top_p = one("max_tokens"), one("top_k", 0), one("top_p", 0.0)
    temperature = one("temperature", 1.0)
    if max_tokens < 1:
        raise _bad("max_tokens", max_tokens, "an integer >= 1")
    if top_k < 0:
        raise _bad("top_k", top_k, "an integer >= 0 (0 turns it off)")
    if not 0 <= top_p <= 1:
        raise _bad("top_p", top_p, "a number in [0, 1] (0 turns it off)")
    if temperature < 0:
        raise _bad("temperature", temperature, "a number >= 0")
    s: dict = {"max_tokens": max_tokens}
    if (top_k == 0 and top_p == 0) or top_k == 1 or temperature == 0:
        s["temperature"] = 0.0                          # TensorRT-LLM's default: greedy
    else:
        s["temperature"] = float(temperature)
        if top_k:
            s["top_k"] = top_k
        if top_p:
            s["top_p"] = float(top_p)
    rp = one("repetition_penalty")
    if rp is not None:
        if not rp > 0:
            raise _bad("repetition_penalty", rp, "a number > 0 (1 turns it off)")
        s["repetition_penalty"] = float(rp)
    for name in ("presence_penalty", "frequency_penalty"):
        v = one(name)
        if v is not None and not -2 <= v <= 2:
            raise _bad(name, v, "a number in [-2, 2] (0 turns it off)")
        if v:
            s[name] = float(v)
    min_length = one("min_length")
    if min_length is not None and not 0 <= min_length <= 1 << 20:
        raise _bad("min_length", min_length, "an integer in [0, 1048576]")
    if min_length and min_length > 1:
        s["min_tokens"] = min_length
    if one("return_log_probs", False):
        s["logprobs"] = 0                   # the sampled token's, no alternatives
    seed = one("random_seed")
    if seed is not None:
        s["seed"] = seed % 2**63
    stop = _words("stop_words", values.get("stop_words", []))
    if stop:
        s["stop"] = stop
    bad = _words("bad_words", values.get("bad_words", []))
    if bad:
        too_long = [w for w in bad if len(w) > MAX_BAD_WORD_CHARS]
        if too_long:
            raise _bad("bad_words", too_long[0], f"words of at most {MAX_BAD_WORD_CHARS} characters")
        s["bad_words"] = bad
    end_id = one("end_id")
    if end_id is not None:
        if end_id < 0:
            raise _bad("end_id", end_id, "a token id >= 0")
        s["ignore_eos"], s["stop_token_ids"] = True, [end_id]   # end_id replaces the model's end token
    one("pad_id"), one("length_penalty")   # pad_id pads batched outputs; length_penalty acts on beams only
    return BlsRequest(prompt, s, stream=bool(one("stream", False)),
                      exclude_input=bool(one("exclude_input_in_output", False)))


def model_metadata(name: str) -> dict:
    """``GET /v2/models/{name}``: the BLS inputs and outputs, with the batch dimension."""
    return {"name": name, "versions": [VERSION], "platform": ALIASES.get(name, "disagg-serve"),
            "inputs": [{"name": n, "datatype": d, "shape": [-1] + dims} for n, (d, dims, _) in INPUTS.items()],
            "outputs": [{"name": n, "datatype": d, "shape": [-1] + dims} for n, (d, dims) in OUTPUTS.items()]}


def model_config(name: str, max_batch: int) -> dict:
    """``GET /v2/models/{name}/config``: the model config as Triton's JSON renders it."""
    kind = {"BYTES": "TYPE_STRING"}
    return {"name": name, "platform": ALIASES.get(name, "disagg-serve"), "max_batch_size": max_batch,
            "model_transaction_policy": {"decoupled": True},
            "input": [{"name": n, "data_type": kind.get(d, "TYPE_" + d), "dims": dims, "optional": not req}
                      for n, (d, dims, req) in INPUTS.items()],
            "output": [{"name": n, "data_type": kind.get(d, "TYPE_" + d), "dims": dims}
                       for n, (d, dims) in OUTPUTS.items()]}


def output_tensors(reqs: list[BlsRequest], answers: list[tuple[str, list]], wanted: list[str]) -> list[Tensor]:
    """The ``infer`` outputs in ``wanted`` for a batch: ``answers`` holds (text, token log-probabilities)
    per row; ``output_log_probs`` rows are padded with zeros to the longest."""
    outs = [r.outputs(text, lps) for r, (text, lps) in zip(reqs, answers)]
    b, width = len(outs), max((len(o["output_log_probs"]) for o in outs), default=0)
    padded = [x for o in outs for x in o["output_log_probs"] + [0.0] * (width - len(o["output_log_probs"]))]
    made = {"text_output": Tensor("text_output", "BYTES", [b, 1], [o["text_output"] for o in outs]),
            "cum_log_probs": Tensor("cum_log_probs", "FP32", [b, 1], [o["cum_log_probs"] for o in outs]),
            "output_log_probs": Tensor("output_log_probs", "FP32", [b, 1, width], padded)}
    return [made[n] for n in wanted]

