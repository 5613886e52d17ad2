"""Perplexity of the engine's model on a fixed text, per (dtype, quantization), with llama.cpp's
``llama-perplexity`` on the same GGUF, text and context as the reference.

Scored as ``llama-perplexity`` scores, so the two numbers measure the same thing: the tokens are
cut into consecutive chunks of ``ctx`` (a remainder shorter than ``ctx`` is dropped); each chunk
is one causal forward from position 0 (its first token replaced by BOS where the tokenizer adds
one), and only the second half is scored: the log-softmax at positions ``ctx/2 .. ctx-2``
predicting the tokens after them, so every scored token has at least ``ctx/2`` of context.
Perplexity = exp(mean negative log-likelihood over all scored tokens).

    python -m bench.perplexity [--configs float32:none,float32:int8] [--ctx 512] [--threads 2]
"""
from __future__ import annotations

import argparse
import math
import os

import torch

from bench import llamacpp
from bench.common import machine, write_json
from bench.engine import config_name, gguf_of, parse_configs, try_load
from workers.engine.loaders import DEFAULT_MODEL
from workers.engine.model import causal_attention

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "perplexity.txt")


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, ctx: int) -> float:
    """The model's perplexity on ``text`` in chunks of ``ctx`` tokens (see the module doc)."""
    ids = tokenizer.encode(text)
    chunks = len(ids) // ctx
    if ctx < 4 or chunks < 1:
        raise ValueError(f"ctx={ctx}: the text has {len(ids)} tokens; expected ctx >= 4 and at "
                         "least one whole chunk")
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos", False) else None
    first = ctx // 2
    positions = torch.arange(ctx)
    nll, scored = 0.0, 0
    for c in range(chunks):
        chunk = torch.tensor(ids[c * ctx:(c + 1) * ctx], dtype=torch.long)
        if bos is not None:
            chunk[0] = bos
        hidden = model(chunk, positions, lambda layer, q, k, v: causal_attention(q, k, v))
        logp = torch.log_softmax(model.logits(hidden[first:ctx - 1]).float(), dim=-1)
        nll -= logp.gather(1, chunk[first + 1:].unsqueeze(1)).double().sum().item()
        scored += ctx - 1 - first
    return math.exp(nll / scored)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.perplexity", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m, tiny, a .gguf file or a HF directory")
    ap.add_argument("--gguf", default=None, help="the GGUF llama.cpp scores (default: the model's own file)")
    ap.add_argument("--configs", default="float32:none,float32:int8",
                    help="DTYPE:QUANTIZATION pairs, comma-separated; ones this tree cannot load are skipped")
    ap.add_argument("--text", default=TEXT, help="the text file")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk")
    ap.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    ap.add_argument("--json", default=None, help="write the results here")
    llamacpp.add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        configs = parse_configs(args.configs)
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    rows = []
    for config in configs:
        loaded = try_load(args.model, config)
        if loaded is not None:
            rows.append({"engine": "ours", "config": config_name(config),
                         "tokens": len(loaded[1].encode(text)),
                         "perplexity": perplexity(loaded[0], loaded[1], text, args.ctx)})
    gguf = gguf_of(args.model, args.gguf)
    peer, _ = llamacpp.peer_from_args(args, gguf)
    if peer is not None:
        try:
            rows.append({"engine": "llama.cpp", "config": os.path.basename(gguf), "tokens": None,
                         "perplexity": peer.perplexity(gguf, args.text, args.ctx, args.threads)})
        except llamacpp.LlamaCppError as e:
            print(f"llama.cpp: skipped ({e})")
    base = next((r["perplexity"] for r in rows if r["config"] == "float32/none"), None)
    for r in rows:
        r["ratio_to_float32"] = r["perplexity"] / base if base else None
    print(f"{os.path.basename(args.text)}, ctx {args.ctx}, {args.threads} thread(s)\n")
    print("| engine | configuration | tokens | perplexity | ratio to float32/none |\n|---|---|---|---|---|")
    for r in rows:
        ratio = "-" if r["ratio_to_float32"] is None else f"{r['ratio_to_float32']:.4f}"
        print(f"| {r['engine']} | {r['config']} | {r['tokens'] or '-'} | {r['perplexity']:.4f} | {ratio} |")
    if args.json:
        write_json(args.json, {"config": vars(args), "machine": machine(), "results": rows})


if __name__ == "__main__":
    main()
