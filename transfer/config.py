"""``cache_transceiver_config``: TensorRT-LLM's transfer settings, validated with clear errors.

The schema is the dataclass itself (a strict pydantic dataclass, unknown keys refused); errors are
the project's one ``ConfigError`` (defined with the other file schemas in ``broker.config``, which
imports nothing of transfer/). This module does no I/O.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from pydantic import Field, field_validator

from broker.config import MAX_INT, ConfigError, checked_dataclass, known_keys, unknown_key, validated

__all__ = ["BACKENDS", "CacheTransceiverConfig", "ConfigError"]

BACKENDS = ("DEFAULT", "NIXL", "UCX", "MPI", "SHM", "ZMQ")
_TEST_BACKENDS = ("FAKE",)             # accepted, not advertised: the in-process test backend
DEFAULT_BUFFER_TOKENS = 4096
DEFAULT_TIMEOUT_MS = 60_000


@checked_dataclass("cache_transceiver_config")
class CacheTransceiverConfig:
    backend: str = "DEFAULT"
    max_tokens_in_buffer: Optional[int] = Field(None, ge=1, le=MAX_INT)
    kv_transfer_timeout_ms: Optional[int] = Field(None, ge=1, le=MAX_INT)
    # where the settings came from (the file, the dotted key of the section), for messages: not settings
    where: str = dataclasses.field(default="cache_transceiver_config", compare=False, repr=False)
    prefix: str = dataclasses.field(default="", compare=False, repr=False)

    _not_keys = ("where", "prefix")

    @field_validator("backend", mode="before")
    @classmethod
    def _backend(cls, v: Any) -> Any:
        if not isinstance(v, str) or v.upper() not in BACKENDS + _TEST_BACKENDS:
            raise ValueError(f"expected one of {', '.join(BACKENDS)}")
        return v.upper()

    def _bad(self, key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.where}: {self.prefix}{key}={value!r}: expected {expected}")

    @classmethod
    def from_dict(cls, d: Optional[dict], *, where: str = "cache_transceiver_config",
                  prefix: str = "") -> "CacheTransceiverConfig":
        """The settings of a YAML map; errors name ``where`` (the file) and ``prefix`` + the key."""
        if d is None:
            return cls(where=where, prefix=prefix)
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: {prefix.rstrip('.') or 'cache_transceiver_config'}={d!r}: "
                              "expected a map of settings")
        for k in cls._not_keys:
            if k in d:
                raise unknown_key(where, f"{prefix}{k}", known_keys(cls), d[k])
        return validated(cls, {**d, "where": where, "prefix": prefix}, where, prefix)

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
