"""``cache_transceiver_config``: TensorRT-LLM's transfer settings, validated with clear errors.

This module does no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

BACKENDS = ("DEFAULT", "NIXL", "UCX", "MPI", "SHM", "ZMQ")
_TEST_BACKENDS = ("FAKE",)             # accepted, not advertised: the in-process test backend
DEFAULT_BUFFER_TOKENS = 4096
DEFAULT_TIMEOUT_MS = 60_000


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and where it came from."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class CacheTransceiverConfig:
    backend: str = "DEFAULT"
    max_tokens_in_buffer: Optional[int] = None
    kv_transfer_timeout_ms: Optional[int] = None
    where: str = field(default="cache_transceiver_config", compare=False, repr=False)

    def __post_init__(self) -> None:
        known = BACKENDS + _TEST_BACKENDS
        if not isinstance(self.backend, str) or self.backend.upper() not in known:
            raise self._bad("backend", self.backend, f"one of {', '.join(BACKENDS)}")
        object.__setattr__(self, "backend", self.backend.upper())
        for key in ("max_tokens_in_buffer", "kv_transfer_timeout_ms"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value < 1):
                raise self._bad(key, value, "an integer >= 1 (or null for the default)")

    def _bad(self, key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.where}: invalid {key}={value!r}: expected {expected}")

    @classmethod
    def from_dict(cls, d: Optional[dict], *,
                  where: str = "cache_transceiver_config") -> "CacheTransceiverConfig":
        if d is None:
            return cls(where=where)
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a map of settings, got {d!r}")
        known = ("backend", "max_tokens_in_buffer", "kv_transfer_timeout_ms")
        for key in d:
            if key not in known:
                raise ConfigError(f"{where}: unknown key {key!r} (value {d[key]!r}); "
                                  f"expected one of {', '.join(known)}")
        return cls(**{k: d[k] for k in known if k in d}, where=where)

    def check_block_size(self, block_size: int) -> None:
        if self.max_tokens_in_buffer is not None and self.max_tokens_in_buffer % block_size:
            raise self._bad("max_tokens_in_buffer", self.max_tokens_in_buffer,
                            f"a multiple of the KV block size {block_size}")

    def buffer_tokens(self, block_size: int) -> int:
        """The staging buffer in tokens: the configured value, or the default rounded up to a
        whole number of blocks."""
        if self.max_tokens_in_buffer is not None:
            return self.max_tokens_in_buffer
        return -(-DEFAULT_BUFFER_TOKENS // block_size) * block_size

    @property
    def timeout_s(self) -> float:
        ms = self.kv_transfer_timeout_ms
        return (DEFAULT_TIMEOUT_MS if ms is None else ms) / 1000.0
