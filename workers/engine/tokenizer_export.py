"""Writes a model's tokenizer as a Hugging Face tokenizer folder, for tools that count tokens
offline (AIPerf, guidellm, ``transformers.AutoTokenizer``) and cannot download one.

Owns the folder layout only: ``tokenizer.json`` (the ``tokenizers`` file format),
``tokenizer_config.json`` (special tokens, BOS rule, chat template, context length) and
``special_tokens_map.json``. Reads the model's metadata and vocabulary, never its weights, and
never does network I/O.
"""
from __future__ import annotations

import json
import os

from .tokenizer import HFTokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def load_tokenizer(spec: str) -> tuple[HFTokenizer, int]:
    """The tokenizer of model ``spec`` and its context length, without loading weights."""
    from .loaders import model_source
    kind, path = model_source(spec)
    if kind == "tiny":
        raise ValueError(f"model {spec!r} has a byte vocabulary, not a Hugging Face tokenizer: "
                         "there is nothing to export")
    if kind == "gguf":
        from .gguf_file import GGUFFile
        from .gguf_loader import read_config
        from .tokenizer import tokenizer_from_gguf
        reader = GGUFFile(path)
        return tokenizer_from_gguf(reader), read_config(reader, path)[1].max_position
    from .hf_loader import _tokenizer, read_config as read_hf_config
    cfg = read_hf_config(path)
    return _tokenizer(path, cfg), cfg.max_position


def export_tokenizer(spec: str, out_dir: str, *, overwrite: bool = False) -> list[str]:
    """Write the folder; returns the paths written. Refuses to replace files unless asked."""
    tok, context = load_tokenizer(spec)
    return write_folder(tok, context, out_dir, overwrite=overwrite)


def write_folder(tok: HFTokenizer, context: int, out_dir: str, *, overwrite: bool = False
                 ) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in FILES]
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists: pass --overwrite to replace it")
    bos = tok._token_text(tok.bos_token_id) or None
    eos = tok._token_text(tok.eos_token_ids[0]) if tok.eos_token_ids else None
    special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v}
    if eos:
        special["pad_token"] = eos     # what serving stacks pad with when the model names none
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context,
        "add_bos_token": tok.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    _file_tokenizer(tok).save(paths[0])
    for path, body in ((paths[1], config), (paths[2], special)):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return paths


def _file_tokenizer(tok: HFTokenizer):
    """A copy of the raw tokenizer whose post-processor adds the BOS where the model wants one:
    the engine encodes without special tokens and adds it itself, but readers of the file rely
    on the post-processor."""
    from tokenizers import Tokenizer, processors
    raw = Tokenizer.from_str(tok.tok.to_str())
    if tok.add_bos:
        bos = tok._token_text(tok.bos_token_id)
        raw.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)])
    return raw
