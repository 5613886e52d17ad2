"""The keys of cached KV blocks: the one definition of the hashes a worker publishes for the
blocks its prefix cache holds (KV events) and the broker computes for a request to route it
(docs/architecture.md §2, "Routing"). Workers and the broker both import it from here.

Two kinds of key, each a chain (a key hashes its chunk with the previous key, so it matches only
after the same whole prefix), 16 bytes of blake2b, the same in every process:

* *Token keys*: one per full block of ``block_size`` prompt token ids, hashed as little-endian
  uint32s. They are the prefix cache's own block hashes (``workers/engine/prefix_cache.py``).
  The broker computes them for a prompt sent as token ids, straight from its packed bytes.
* *Text keys*: one per ``TEXT_CHUNK`` characters of a prompt sent as text, or of a chat's
  messages written out canonically (``chat_text``). The broker never tokenizes (the tokenizer
  lives with the model, on the workers), so for a text prompt it routes on these; a worker that
  holds a text prompt's blocks publishes the text keys those blocks cover (``text_ties``).

Pure: standard library only, no I/O.
"""
from __future__ import annotations

import sys
from array import array
from hashlib import blake2b
from typing import Optional, Sequence

KEY_BYTES = 16               # one key, as published and matched
TEXT_CHUNK = 64              # characters per text key (about one 16-token block of English)
MAX_REQUEST_KEYS = 4096      # keys computed for one request: routing looks no deeper
_TYPECODE = next(c for c in "IL" if array(c).itemsize == 4)
_SWAP = sys.byteorder != "little"
_TEXT, _CHAT = b"dsrv-text", b"dsrv-chat"       # blake2b personalisations: text and chat keys
                                                # never equal token keys or each other


def block_hashes(token_ids: Sequence[int], block_size: int, num_blocks: int) -> list[bytes]:
    """The chained keys of the first ``num_blocks`` full blocks of ``token_ids``."""
    a = array(_TYPECODE, token_ids[:num_blocks * block_size])
    if _SWAP:
        a.byteswap()
    return packed_block_hashes(a.tobytes(), block_size, num_blocks)


def packed_block_hashes(packed: bytes, block_size: int, num_blocks: int) -> list[bytes]:
    """``block_hashes`` of token ids packed as little-endian uint32s (``protocol.TokenIds.packed``)."""
    step = 4 * block_size
    num_blocks = min(num_blocks, len(packed) // step)
    hashes, parent = [], b""
    for i in range(0, num_blocks * step, step):
        parent = blake2b(parent + packed[i:i + step], digest_size=KEY_BYTES).digest()
        hashes.append(parent)
    return hashes


def chat_text(messages: Sequence[dict]) -> str:
    """A chat's messages as one string, for text keys: two chats that begin with the same
    messages give strings that begin alike (multi-turn: each turn resends the ones before)."""
    return "".join(f"{m.get('role', '')}\x1f{m.get('content', '')}\x1e" for m in messages)


def chat_chars(messages: Sequence[dict]) -> int:
    """``len(chat_text(messages))`` without building the string (the routers count it per pick)."""
    return sum(len(m.get("role", "")) + len(m.get("content", "")) + 2 for m in messages)


def prompt_text(prompt: Optional[str], messages: Optional[Sequence[dict]]) -> Optional[tuple]:
    """``(text, chat)`` of a request sent as text or as messages; None for token ids."""
    if prompt is not None:
        return prompt, False
    if messages is not None:
        return chat_text(messages), True
    return None


def text_keys(text: str, chat: bool = False, limit: int = MAX_REQUEST_KEYS) -> list[bytes]:
    """The chained keys of the full ``TEXT_CHUNK``-character chunks of ``text`` (at most ``limit``)."""
    person = _CHAT if chat else _TEXT
    keys, parent = [], b""
    for i in range(0, min(len(text) // TEXT_CHUNK, limit) * TEXT_CHUNK, TEXT_CHUNK):
        parent = blake2b(parent + text[i:i + TEXT_CHUNK].encode("utf-8", "surrogatepass"),
                         digest_size=KEY_BYTES, person=person).digest()
        keys.append(parent)
    return keys


def text_ties(num_keys: int, text_chars: int, num_tokens: int, block_size: int,
              full_blocks: int) -> list[int]:
    """For each text key of a prompt (``text_chars`` characters that encoded to ``num_tokens``
    tokens), the index of the block its text ends in, while that block is one of the first
    ``full_blocks``: the block whose eviction makes the key stale. Characters are mapped to
    tokens in proportion (the broker's routing needs the prefix a worker holds, not its exact
    last token)."""
    out = []
    if text_chars <= 0 or num_tokens <= 0:
        return out
    for j in range(num_keys):
        end = -(-(j + 1) * TEXT_CHUNK * num_tokens // text_chars)      # tokens to cover the chunk
        b = (end - 1) // block_size
        if b >= full_blocks:
            break
        out.append(b)
    return out
