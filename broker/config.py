"""Broker settings, and the TensorRT-LLM-style ``disagg_config.yaml`` reader.

This module does no I/O beyond reading the config file it is given.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key, the value and the file."""


@dataclass(frozen=True)
class BrokerConfig:
    heartbeat_interval_s: float = 1.0   # broker -> worker heartbeats
    liveness: int = 3                   # missed worker intervals before a worker is expired
    max_queue: int = 1024               # queued requests past which Submit gets OVERLOADED
    request_timeout_s: float = 600.0    # deadline of a request that gives none
    kv_lease_s: float = 30.0            # how long a context worker holds KV waiting for the pull
    max_attempts: int = 3               # prefill attempts (worker deaths, retryable failures)

    def __post_init__(self) -> None:
        checks = {
            "heartbeat_interval_s": self.heartbeat_interval_s > 0,
            "liveness": isinstance(self.liveness, int) and self.liveness >= 1,
            "max_queue": isinstance(self.max_queue, int) and self.max_queue >= 1,
            "request_timeout_s": self.request_timeout_s > 0,
            "kv_lease_s": self.kv_lease_s > 0,
            "max_attempts": isinstance(self.max_attempts, int) and self.max_attempts >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid broker setting {name}={getattr(self, name)!r}")


@dataclass(frozen=True)
class ServerGroup:
    num_instances: int = 1
    urls: tuple = ()
    router: dict = field(default_factory=dict)
    extra_llm_api_options: Optional[str] = None   # path of the workers' extra options YAML
    args: tuple = ()                              # extra command-line words for each worker
    options: dict = field(default_factory=dict)   # inline worker options (kv_cache_config, ...)


@dataclass(frozen=True)
class DisaggConfig:
    """The subset of TensorRT-LLM's ``disagg_config.yaml`` this broker understands, plus our keys."""
    hostname: str = "127.0.0.1"
    port: int = 8000
    model: str = "smollm2-135m"
    backend: str = "pytorch"
    context_servers: ServerGroup = ServerGroup()
    generation_servers: ServerGroup = ServerGroup()
    broker: BrokerConfig = BrokerConfig()
    frontend: str = "tcp://127.0.0.1:*"       # our addition: the client-facing ZeroMQ address
    backend_address: str = "tcp://127.0.0.1:*"  # our addition: the worker-facing ZeroMQ address
    source: str = "<defaults>"


_TOP_KEYS = {"hostname", "port", "model", "backend", "context_servers", "generation_servers",
             "broker", "frontend", "backend_address", "free_gpu_memory_fraction",
             "disagg_cluster", "max_retries", "perf_metrics_max_requests"}
_GROUP_KEYS = {"num_instances", "urls", "router", "extra_llm_api_options", "args",
               # TensorRT-LLM per-group engine settings: accepted and handed to the workers' YAML
               "tensor_parallel_size", "pipeline_parallel_size", "max_batch_size",
               "max_num_tokens", "max_seq_len", "kv_cache_config", "cache_transceiver_config",
               "disable_overlap_scheduler", "print_iter_log", "enable_chunked_prefill",
               "tokens_per_block", "num_threads", "heartbeat_ms", "broker_timeout_ms", "backend"}


_STRUCTURAL = {"num_instances", "urls", "router", "extra_llm_api_options", "args"}


def _group(d: Any, name: str, source: str) -> ServerGroup:
    if d is None:
        return ServerGroup(num_instances=0)
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: {name} must be a map, got {d!r}")
    for k in d:
        if k not in _GROUP_KEYS:
            raise ConfigError(f"{source}: unknown key {name}.{k}; known: {', '.join(sorted(_GROUP_KEYS))}")
    n = d.get("num_instances", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"{source}: {name}.num_instances must be an integer >= 0, got {n!r}")
    args = d.get("args", [])
    if isinstance(args, str):
        args = args.split()
    return ServerGroup(num_instances=n, urls=tuple(d.get("urls") or ()),
                       router=dict(d.get("router") or {}),
                       extra_llm_api_options=d.get("extra_llm_api_options"), args=tuple(args),
                       options={k: v for k, v in d.items() if k not in _STRUCTURAL})


def load_disagg_config(path: str) -> DisaggConfig:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return parse_disagg_config(raw, source=path)


def parse_disagg_config(raw: dict, source: str = "<dict>") -> DisaggConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a map at the top level")
    for k in raw:
        if k not in _TOP_KEYS:
            raise ConfigError(f"{source}: unknown key {k!r}; known: {', '.join(sorted(_TOP_KEYS))}")
    b = raw.get("broker") or {}
    names = {f.name for f in dataclasses.fields(BrokerConfig)}
    for k in b:
        if k not in names:
            raise ConfigError(f"{source}: unknown key broker.{k}; known: {', '.join(sorted(names))}")
    try:
        broker = BrokerConfig(**b)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    port = raw.get("port", 8000)
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise ConfigError(f"{source}: port must be an integer in [0, 65535], got {port!r}")
    return DisaggConfig(
        hostname=str(raw.get("hostname", "127.0.0.1")), port=port,
        model=str(raw.get("model", "smollm2-135m")), backend=str(raw.get("backend", "pytorch")),
        context_servers=_group(raw.get("context_servers"), "context_servers", source),
        generation_servers=_group(raw.get("generation_servers"), "generation_servers", source),
        broker=broker,
        frontend=str(raw.get("frontend", "tcp://127.0.0.1:*")),
        backend_address=str(raw.get("backend_address", "tcp://127.0.0.1:*")),
        source=source,
    )
