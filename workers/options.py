"""The worker's extra options YAML (TensorRT-LLM's ``--extra_llm_api_options`` schema, plus ours).

The schema (``broker.config.EngineOptions``) is shared with the per-group keys of
``disagg_config.yaml``. Known TensorRT-LLM keys that mean nothing on this engine are accepted and
logged once, with the reason; an unknown key or a bad value is a ``ConfigError`` naming the file,
the dotted key and the value. A file ``broker launch`` wrote carries an ``origin`` entry, and
then errors and notices name the user's ``disagg_config.yaml`` (or the group's own options file)
instead. This module does no I/O beyond reading that file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import ValidationError, create_model

from broker.config import (ORIGIN_KEY, EngineOptions, Schema, config_error, engine_notices,
                           log_not_supported, read_yaml, validated)
from transfer.config import CacheTransceiverConfig, ConfigError

log = logging.getLogger("workers.options")


@dataclass(frozen=True)
class TorchCompile:
    """``torch_compile_config``: the decode step through ``torch.compile`` (workers/engine/compiled.py)."""
    fullgraph: bool = True              # enable_fullgraph
    batch_sizes: tuple[int, ...] = ()   # capture_num_tokens, warmed up before registering; () = default


@dataclass(frozen=True)
class WorkerOptions:
    max_batch_size: int = 64           # concurrent requests (the broker's slot credits)
    max_num_tokens: int = 512          # prefill chunk: heartbeats and decodes run between chunks
    max_seq_len: Optional[int] = None  # default: the model's context length
    tokens_per_block: int = 16
    kv_max_tokens: Optional[int] = None   # kv_cache_config.max_tokens: KV pool size in tokens (16384)
    dtype: str = "auto"                # compute dtype: float32 on the CPU, bf16/fp16 on a GPU
    quantization: str = "auto"         # CPU: int8 where 8-bit weights are exact, else fp16 (precision.py)
    device: str = "auto"               # cuda:0 where CUDA is present, else cpu
    kv_gpu_fraction: Optional[float] = None   # kv_cache_config.free_gpu_memory_fraction (GPU only)
    kv_dtype: str = "auto"             # kv_cache_config.dtype; auto: the model's compute dtype
    block_reuse: bool = True           # kv_cache_config.enable_block_reuse: prefix caching
    cache_transceiver: CacheTransceiverConfig = field(default_factory=CacheTransceiverConfig)
    num_threads: int = 1               # torch threads; one per worker is fastest on small machines
    torch_compile: Optional[TorchCompile] = None   # torch_compile_config; None: eager decode
    heartbeat_ms: int = 1000
    broker_timeout_ms: int = 5000      # silence from the broker before reconnecting
    source: str = "<defaults>"


class Origin(Schema):
    """Where the keys of a file ``broker launch`` wrote came from (``broker.config.worker_options``)."""
    file: str                      # the disagg_config.yaml
    key: str                       # its server group: context_servers or generation_servers
    inline: list[str] = []         # the keys the group set there
    top: list[str] = []            # the keys the file set at its top level, for both groups
    base: Optional[str] = None     # the group's extra_llm_api_options file, for the other keys

    def at(self, top_key: Any, source: str) -> tuple[str, str]:
        """(file, dotted prefix) a key with this top-level key is reported against."""
        if top_key in self.inline:
            return self.file, f"{self.key}."
        if top_key in self.top:
            return self.file, ""
        return (self.base or source), ""


WorkerOptionsSchema = create_model("WorkerOptionsSchema", __base__=EngineOptions,
                                   **{ORIGIN_KEY: (Optional[Origin], None)})
_PLAIN = ("max_batch_size", "max_num_tokens", "max_seq_len", "num_threads", "heartbeat_ms", "broker_timeout_ms",
          "dtype", "quantization", "device")


def parse_options(raw: Optional[dict], source: str = "<dict>") -> WorkerOptions:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a map at the top level, got {type(raw).__name__}")
    origin = (validated(Origin, raw[ORIGIN_KEY], source, f"{ORIGIN_KEY}.") if raw.get(ORIGIN_KEY) is not None
              else Origin(file=source, key=""))

    def at(top_key: Any) -> tuple[str, str]:
        return origin.at(top_key, source)

    try:
        opts = WorkerOptionsSchema.model_validate(raw)
    except ValidationError as e:
        loc = e.errors(include_url=False)[0]["loc"]
        raise config_error(e, WorkerOptionsSchema, *at(loc[0] if loc else None)) from None
    for key, reason in engine_notices(opts):
        where, prefix = at(key.split(".")[0])
        log_not_supported(where, prefix + key, reason, log)
    kv = opts.kv_cache_config
    block = opts.tokens_per_block or 16
    if kv is not None and kv.tokens_per_block is not None:     # where newer TensorRT-LLM versions put it
        if opts.tokens_per_block is not None and kv.tokens_per_block != opts.tokens_per_block:
            where, prefix = at("tokens_per_block")
            raise ConfigError(f"{where}: {prefix}tokens_per_block={opts.tokens_per_block} and "
                              f"{prefix}kv_cache_config.tokens_per_block={kv.tokens_per_block} disagree")
        block = kv.tokens_per_block
    where, prefix = at("cache_transceiver_config")
    ctc = CacheTransceiverConfig.from_dict(opts.cache_transceiver_config, where=where,
                                           prefix=f"{prefix}cache_transceiver_config.")
    ctc.check_block_size(block)
    kw = {k: getattr(opts, k) for k in _PLAIN if getattr(opts, k) is not None}
    if kv is not None and kv.max_tokens is not None:
        kw["kv_max_tokens"] = kv.max_tokens
    if kv is not None and kv.free_gpu_memory_fraction is not None:
        kw["kv_gpu_fraction"] = kv.free_gpu_memory_fraction
    if kv is not None and kv.dtype is not None:
        kw["kv_dtype"] = kv.dtype
    if kv is not None and kv.enable_block_reuse is not None:
        kw["block_reuse"] = kv.enable_block_reuse
    tc = opts.torch_compile_config
    if tc is not None:
        sizes = tuple(sorted(set(tc.capture_num_tokens or ())))
        batch = kw.get("max_batch_size", WorkerOptions.max_batch_size)
        if sizes and sizes[-1] > batch:
            where, prefix = at("torch_compile_config")
            raise ConfigError(f"{where}: {prefix}torch_compile_config.capture_num_tokens="
                              f"{list(tc.capture_num_tokens)}: {sizes[-1]} is above max_batch_size={batch}, "
                              "and a decode step never holds more sequences than that")
        kw["torch_compile"] = TorchCompile(tc.enable_fullgraph, sizes)
    result = WorkerOptions(**kw, tokens_per_block=block, cache_transceiver=ctc, source=source)
    if result.kv_max_tokens is not None and result.kv_max_tokens < block:
        where, prefix = at("kv_cache_config")
        raise ConfigError(f"{where}: {prefix}kv_cache_config.max_tokens={result.kv_max_tokens} is smaller "
                          f"than one block of {block} tokens")
    return result


def load_options(path: Optional[str]) -> WorkerOptions:
    if not path:
        return parse_options({}, "<defaults>")
    return parse_options(read_yaml(path, "worker options"), path)
