"""Text <-> token ids, chat templates, and incremental detokenization for streaming.

Owns: the byte tokenizer of the tiny test model, a wrapper over the ``tokenizers`` library, and
the rebuild of a GGUF file's byte-level BPE vocabulary for that library. Never loads weights and
never does network I/O; ``tokenizer_from_gguf`` only reads fields of an already opened reader.
"""
from __future__ import annotations

import datetime
from typing import Sequence

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """The interface the engine uses. ``encode`` adds a BOS only where the model expects one."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # The most characters one token stands for: a text longer than n * max_token_chars encodes
    # to more than n tokens, so a prompt that cannot fit is refused without encoding it.
    max_token_chars: int = 1

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens (BOS, EOS, ChatML markers) left out."""
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt text for a chat, ending with the assistant's generation prompt."""
        raise NotImplementedError

    def chat_markers(self) -> tuple[str, ...]:
        """The special tokens the model's own chat template writes (``<|im_start|>``...): a
        prompt holding one is already templated. Empty when the model ships no template (a base
        model, or the tiny test model), whose prompts are never templated unasked."""
        return ()

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own text as bytes (possibly part of a UTF-8 character; a special token's
        name): what a log-probability entry shows for it."""
        raise NotImplementedError


def chatml(messages: list[dict]) -> str:
    """The ChatML prompt: the fallback for models that ship no chat template."""
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes, 256 is BOS, 257 is EOS: the tiny test model's vocabulary."""

    BOS = 256
    EOS = 257

    def __init__(self) -> None:
        self.vocab_size = 258
        self.bos_token_id = self.BOS
        self.eos_token_ids = (self.EOS,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # errors="replace" matches the byte-level BPE decoders: an incomplete sequence at the end
        # becomes U+FFFD, which incremental_text holds back.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict]) -> str:
        return chatml(messages)

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if 0 <= token_id < 256 else b""


def _gpt2_byte_map() -> dict[str, int]:
    """The character byte-level BPE writes for each byte (GPT-2's ``bytes_to_unicode``), inverted."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _gpt2_byte_map()


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` plus the model's BOS/EOS ids and its jinja chat template."""

    def __init__(self, tok, *, bos_token_id: int | None, eos_token_ids: Sequence[int],
                 chat_template: str | None = None, add_bos: bool = False) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.chat_template = chat_template
        # a byte-level BPE token's string has one character per byte, and a character is at
        # least one byte; a sentencepiece token's has one per character (byte tokens <0x0A>:
        # more): its length bounds the characters it stands for either way
        self.max_token_chars = max(map(len, tok.get_vocab(with_added_tokens=True)), default=1)
        self.add_bos = add_bos and bos_token_id is not None
        self._template = None
        self._byte_level = type(tok.decoder).__name__ == "ByteLevel"
        self._bytes: dict[int, bytes] = {}     # token_bytes, as asked

    def encode(self, text: str) -> list[int]:
        if len(text) >= 16_384:   # encode_batch releases the GIL (same ids): other threads run
            ids = self.tok.encode_batch([text], add_special_tokens=False)[0].ids
        else:
            ids = self.tok.encode(text, add_special_tokens=False).ids
        # A chat template often writes the BOS text itself: never add a second one.
        if self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        b = self._bytes.get(token_id)
        if b is None:
            piece = self.tok.id_to_token(token_id) or ""
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):   # a byte token
                b = bytes([int(piece[3:5], 16)])
            elif self._byte_level and all(c in _BYTE_OF for c in piece):
                b = bytes(_BYTE_OF[c] for c in piece)
            else:                                 # sentencepiece: U+2581 stands for a space
                b = piece.replace("\u2581", " ").encode()
            if len(self._bytes) < 1 << 20:
                self._bytes[token_id] = b
        return b

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.tok.id_to_token(token_id) or "")

    def apply_chat_template(self, messages: list[dict]) -> str:
        if not self.chat_template:
            return chatml(messages)
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            # The sandbox matters: templates come with downloaded models.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        return self._template.render(messages=messages, add_generation_prompt=True,
                                     bos_token=self._token_text(self.bos_token_id),
                                     eos_token=self._token_text(eos))

    def chat_markers(self) -> tuple[str, ...]:
        if not self.chat_template:
            return ()
        try:
            text = self.apply_chat_template([{"role": "user", "content": "?"}])
        except Exception:      # a template that cannot render this: never templated automatically
            return ()
        special = self.tok.get_added_tokens_decoder().values()
        return tuple(dict.fromkeys(t.content for t in special if t.special and t.content in text))


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


# ---------------------------------------------------------------------------------------------
# GGUF vocabulary -> tokenizers.Tokenizer

_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's tokenizer.ggml.pre names -> (split each digit first?, regex or None for GPT-2's own)
_PRE_TOKENIZERS = {
    "default": (False, None),
    "gpt-2": (False, None),
    "smollm": (True, None),      # SmolLM/StarCoder: digits one by one, then GPT-2 byte-level
    "starcoder": (True, None),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT),
}
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def _field(reader, key: str, default=None):
    """A metadata value from our GGUFFile (plain values) or from gguf.GGUFReader (field objects)."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents() if hasattr(f, "contents") else f


def tokenizer_from_gguf(reader) -> HFTokenizer:
    """Rebuild the byte-level BPE tokenizer stored in a GGUF file's ``tokenizer.*`` fields.

    ``reader`` is a ``gguf.GGUFReader`` or this package's faster ``GGUFFile``."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported: expected 'gpt2' "
                         "(byte-level BPE)")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; known: "
                         f"{', '.join(sorted(_PRE_TOKENIZERS))}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))

    tok = RawTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                  fuse_unk=False))
    split_digits, regex = _PRE_TOKENIZERS[pre]
    steps = []
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|im_end|>, ...) must match whole, before BPE splits them.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _TOKEN_TYPE_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _TOKEN_TYPE_USER_DEFINED])

    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(i for i in (eos, eot) if i is not None))
    return HFTokenizer(tok, bos_token_id=bos, eos_token_ids=eos_ids,
                       chat_template=_field(reader, "tokenizer.chat_template"),
                       add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)))


# ---------------------------------------------------------------------------------------------
# streaming

def incremental_text(tok: Tokenizer, output_ids: Sequence[int], emitted_chars: int, *,
                     stop: Sequence[str] = (), final: bool = False) -> str:
    """The text to emit now: ``decode(output_ids)[emitted_chars:]`` minus what must wait.

    A pure function of its arguments, so the context worker (first token) and the generation
    worker (the rest) cut the same text at the same places and never duplicate or drop a char.
    Held back until more tokens arrive: trailing U+FFFD (an incomplete UTF-8 sequence that the
    next token may complete) and, when ``stop`` is given, a tail that could be the start of a
    stop string (so a stop string split across tokens never reaches the client). ``final=True``
    releases everything.
    """
    text = tok.decode(output_ids)
    end = len(text)
    if not final:
        while end > emitted_chars and text[end - 1] == REPLACEMENT_CHAR:
            end -= 1
        end = min(end, _stop_prefix_start(text[:end], stop, emitted_chars))
    return text[emitted_chars:end] if end > emitted_chars else ""


def _stop_prefix_start(text: str, stop: Sequence[str], floor: int) -> int:
    """Where the longest tail of ``text`` that is a proper prefix of a stop string begins."""
    cut = len(text)
    for s in stop:
        for n in range(min(len(s) - 1, len(text) - floor), 0, -1):
            if text.endswith(s[:n]):
                cut = min(cut, len(text) - n)
                break
    return cut
