"""The worker's extra options YAML (TensorRT-LLM's ``--extra_llm_api_options`` schema, plus ours).

Known TensorRT-LLM keys that have no meaning on this engine are accepted and logged; an unknown
key is an error naming the key and the file. This module does no I/O beyond reading that file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from broker.config import KV_CACHE_KEYS, WORKER_IGNORED, WORKER_KEYS, unknown_key
from transfer.config import CacheTransceiverConfig, ConfigError

log = logging.getLogger("workers.options")

# TensorRT-LLM's LLM-API vocabulary, shared with the per-group keys of disagg_config.yaml
_KNOWN, _IGNORED, _KV_KEYS = WORKER_KEYS, WORKER_IGNORED, KV_CACHE_KEYS


@dataclass(frozen=True)
class WorkerOptions:
    max_batch_size: int = 64           # concurrent requests (the broker's slot credits)
    max_num_tokens: int = 512          # prefill chunk: heartbeats and decodes run between chunks
    max_seq_len: Optional[int] = None  # default: the model's context length
    tokens_per_block: int = 16
    kv_max_tokens: int = 16384         # kv_cache_config.max_tokens: KV pool size in tokens
    cache_transceiver: CacheTransceiverConfig = field(default_factory=CacheTransceiverConfig)
    num_threads: int = 1               # torch threads; one per worker is fastest on small machines
    heartbeat_ms: int = 1000
    broker_timeout_ms: int = 5000      # silence from the broker before reconnecting
    source: str = "<defaults>"


def _int(d: dict, key: str, where: str, default: Any, minimum: int = 1) -> Any:
    v = d.get(key, default)
    if v is None and default is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"{where}: {key} must be an integer >= {minimum}, got {v!r}")
    return v


def parse_options(raw: Optional[dict], source: str = "<dict>") -> WorkerOptions:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a map at the top level, got {type(raw).__name__}")
    for k in raw:
        if k in _IGNORED:
            log.info("%s: %s has no effect on this engine; ignored", source, k)
        elif k not in _KNOWN:
            raise ConfigError(str(unknown_key(source, k, _KNOWN | _IGNORED)))
    kv = raw.get("kv_cache_config") or {}
    if not isinstance(kv, dict):
        raise ConfigError(f"{source}: kv_cache_config must be a map, got {kv!r}")
    for k in kv:
        if k not in _KV_KEYS:
            raise ConfigError(str(unknown_key(source, f"kv_cache_config.{k}", _KV_KEYS)))
    block = _int(raw, "tokens_per_block", source, 16)
    if "tokens_per_block" in kv:     # where newer TensorRT-LLM versions put it
        kv_block = _int(kv, "tokens_per_block", f"{source}: kv_cache_config", 16)
        if "tokens_per_block" in raw and kv_block != block:
            raise ConfigError(f"{source}: tokens_per_block={block} and kv_cache_config.tokens_per_block="
                              f"{kv_block} disagree")
        block = kv_block
    ctc = CacheTransceiverConfig.from_dict(raw.get("cache_transceiver_config"),
                                           where=f"{source}: cache_transceiver_config")
    ctc.check_block_size(block)
    opts = WorkerOptions(
        max_batch_size=_int(raw, "max_batch_size", source, 64),
        max_num_tokens=_int(raw, "max_num_tokens", source, 512),
        max_seq_len=_int(raw, "max_seq_len", source, None),
        tokens_per_block=block,
        kv_max_tokens=_int(kv, "max_tokens", f"{source}: kv_cache_config", 16384),
        cache_transceiver=ctc,
        num_threads=_int(raw, "num_threads", source, 1),
        heartbeat_ms=_int(raw, "heartbeat_ms", source, 1000, minimum=10),
        broker_timeout_ms=_int(raw, "broker_timeout_ms", source, 5000, minimum=10),
        source=source,
    )
    if opts.kv_max_tokens < block:
        raise ConfigError(f"{source}: kv_cache_config.max_tokens={opts.kv_max_tokens} is smaller "
                          f"than one block of {block} tokens")
    return opts


def load_options(path: Optional[str]) -> WorkerOptions:
    if not path:
        return parse_options({}, "<defaults>")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read worker options {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return parse_options(raw, path)
