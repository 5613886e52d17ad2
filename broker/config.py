"""Broker settings, and the reader of TensorRT-LLM's ``disagg_config.yaml`` (kept compatible).

This module does no I/O beyond reading the config file it is given.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

log = logging.getLogger("broker.config")


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


# ---------------------------------------------------------------------------------------------
# TensorRT-LLM's vocabulary. The worker's extra options YAML (``workers/options.py``) and the
# per-group engine keys of ``disagg_config.yaml`` share it, so both accept the same files.

WORKER_KEYS = {"max_batch_size", "max_num_tokens", "max_seq_len", "tokens_per_block", "kv_cache_config",
               "cache_transceiver_config",
               "num_threads", "heartbeat_ms", "broker_timeout_ms"}      # the last three are ours
# LLM-API keys accepted, logged and ignored: GPU-, parallelism- or TensorRT-specific
WORKER_IGNORED = {"backend", "tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size",
                  "moe_expert_parallel_size", "moe_tensor_parallel_size", "moe_config",
                  "disable_overlap_scheduler", "print_iter_log", "enable_attention_dp", "attention_dp_config",
                  "cuda_graph_config", "use_cuda_graph", "pytorch_backend_config", "enable_chunked_prefill",
                  "scheduler_config", "trust_remote_code", "enable_iter_perf_stats", "stream_interval",
                  "return_perf_metrics", "num_postprocess_workers", "enable_autotuner", "batch_wait_timeout_ms",
                  "attn_backend", "sampler_type", "allreduce_strategy", "load_format", "checkpoint_format",
                  "max_beam_width", "max_input_len", "enable_layerwise_nvtx_marker", "gpus_per_node",
                  "free_gpu_memory_fraction", "speculative_config", "guided_decoding_backend",
                  "enable_mixed_sampler", "torch_compile_config", "iter_stats_max_iterations",
                  "request_stats_max_iterations", "print_iter_log", "model_kwargs"}
KV_CACHE_KEYS = {"max_tokens", "tokens_per_block", "free_gpu_memory_fraction", "enable_block_reuse", "dtype",
                 "host_cache_size", "max_attention_window", "event_buffer_max_size", "sink_token_length",
                 "onboard_blocks", "cross_kv_cache_fraction", "secondary_offload_min_priority",
                 "enable_partial_reuse", "copy_on_partial_reuse", "use_uvm", "max_gpu_total_bytes"}

# top-level keys of TensorRT-LLM's disaggregated-server config that change nothing here
_DISAGG_IGNORED = {"max_retries", "perf_metrics_max_requests", "return_perf_metrics", "perf_metrics_output_dir",
                   "conditional_disagg_config", "otlp_config", "node_id", "allow_request_chat_template",
                   "gen_strip_message_history", "gen_tokids_ctxbytes", "num_workers", "disagg_coordinator_url",
                   "schedule_style"}
_OURS = {"broker", "frontend", "backend_address"}
_TOP_KEYS = {"hostname", "port", "model", "context_servers", "generation_servers", "disagg_cluster"} \
    | _DISAGG_IGNORED | _OURS
_STRUCTURAL = {"num_instances", "urls", "router", "extra_llm_api_options", "args"}
_ROUTERS = {"round_robin", "load_balancing", "kv_cache_aware"}
_CLUSTER_KEYS = {"cluster_uri", "cluster_name", "minimal_instances", "heartbeat_interval_sec",
                 "inactive_timeout_sec"}


def unknown_key(where: str, key: str, known: set) -> ConfigError:
    """The error for an unknown key: the file, the dotted key, the closest known spelling."""
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, sorted(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{where}: unknown key '{key}'; {hint}known: {', '.join(sorted(known))}")


def check_worker_keys(d: dict, where: str, prefix: str = "") -> None:
    """Unknown engine keys (and unknown kv_cache_config keys) are errors naming the key and where."""
    known = WORKER_KEYS | WORKER_IGNORED
    for k in d:
        if k not in known:
            raise unknown_key(where, f"{prefix}{k}", known)
    kv = d.get("kv_cache_config")
    if kv is not None and not isinstance(kv, dict):
        raise ConfigError(f"{where}: {prefix}kv_cache_config must be a map, got {kv!r}")
    for k in kv or {}:
        if k not in KV_CACHE_KEYS:
            raise unknown_key(where, f"{prefix}kv_cache_config.{k}", KV_CACHE_KEYS)


@dataclass(frozen=True)
class ServerGroup:
    num_instances: int = 1
    urls: tuple = ()
    router: dict = field(default_factory=dict)
    extra_llm_api_options: Optional[str] = None   # path of the workers' extra options YAML (ours)
    args: tuple = ()                              # extra command-line words for each worker (ours)
    options: dict = field(default_factory=dict)   # inline worker options (kv_cache_config, ...)


@dataclass(frozen=True)
class DisaggConfig:
    """TensorRT-LLM's ``disagg_config.yaml`` as this broker reads it, plus our keys.

    ``hostname:port`` is where the HTTP gateway listens; ``min_workers`` is what ``/health``
    needs up (``disagg_cluster.minimal_instances``, else each group's ``num_instances``).
    """
    hostname: str = "127.0.0.1"
    port: int = 8000
    model: str = "smollm2-135m"
    backend: str = "pytorch"
    context_servers: ServerGroup = ServerGroup()
    generation_servers: ServerGroup = ServerGroup()
    min_workers: dict = field(default_factory=lambda: {"context": 1, "generation": 1})
    broker: BrokerConfig = BrokerConfig()
    frontend: str = "tcp://127.0.0.1:*"       # our addition: the client-facing ZeroMQ address
    backend_address: str = "tcp://127.0.0.1:*"  # our addition: the worker-facing ZeroMQ address
    source: str = "<defaults>"


def _int_at(v: Any, key: str, source: str, minimum: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"{source}: {key} must be an integer >= {minimum}, got {v!r}")
    return v


def _group(d: Any, name: str, source: str, inherited: dict) -> ServerGroup:
    if d is None:
        return ServerGroup(num_instances=0)
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: {name} must be a map, got {d!r}")
    engine = {k: v for k, v in d.items() if k not in _STRUCTURAL}
    check_worker_keys(engine, source, f"{name}.")
    for k, v in inherited.items():     # TensorRT-LLM: top-level engine keys apply to both groups
        if k in engine and engine[k] != v:
            raise ConfigError(f"{source}: {k} is set at the top level ({v!r}) and in {name} "
                              f"({engine[k]!r}) with different values")
        engine.setdefault(k, v)
    n = _int_at(d.get("num_instances", 1), f"{name}.num_instances", source)
    urls = d.get("urls") or ()
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, (list, tuple)) or not all(isinstance(u, str) for u in urls):
        raise ConfigError(f"{source}: {name}.urls must be a list of HOST:PORT strings, got {urls!r}")
    if urls and len(urls) != n:
        raise ConfigError(f"{source}: {name}.urls lists {len(urls)} servers but num_instances is {n}")
    router = d.get("router") or {}
    if not isinstance(router, dict):
        raise ConfigError(f"{source}: {name}.router must be a map, got {router!r}")
    rtype = router.get("type", "round_robin")
    if rtype not in _ROUTERS:
        raise ConfigError(f"{source}: {name}.router.type={rtype!r}: expected one of {', '.join(sorted(_ROUTERS))}")
    args = d.get("args", [])
    if isinstance(args, str):
        args = args.split()
    opts = d.get("extra_llm_api_options")
    if opts is not None and not isinstance(opts, str):
        raise ConfigError(f"{source}: {name}.extra_llm_api_options must be a file path, got {opts!r}")
    return ServerGroup(num_instances=n, urls=tuple(urls), router=dict(router),
                       extra_llm_api_options=opts, args=tuple(str(a) for a in args), options=engine)


def _cluster_minimum(d: Any, source: str) -> Optional[dict]:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: disagg_cluster must be a map, got {d!r}")
    for k in d:
        if k not in _CLUSTER_KEYS:
            raise unknown_key(source, f"disagg_cluster.{k}", _CLUSTER_KEYS)
    mi = d.get("minimal_instances")
    if mi is None:
        return {"context": 1, "generation": 1}     # TensorRT-LLM's defaults
    if not isinstance(mi, dict):
        raise ConfigError(f"{source}: disagg_cluster.minimal_instances must be a map, got {mi!r}")
    for k in mi:
        if k not in ("context_servers", "generation_servers"):
            raise unknown_key(source, f"disagg_cluster.minimal_instances.{k}",
                              {"context_servers", "generation_servers"})
    return {"context": _int_at(mi.get("context_servers", 1), "disagg_cluster.minimal_instances.context_servers", source),
            "generation": _int_at(mi.get("generation_servers", 1),
                                  "disagg_cluster.minimal_instances.generation_servers", source)}


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
    # TensorRT-LLM hands every other top-level key to both groups as an LLM-API option
    inherited = {k: v for k, v in raw.items() if k not in _TOP_KEYS}
    known = _TOP_KEYS | WORKER_KEYS | WORKER_IGNORED
    for k in inherited:
        if k not in known:
            raise unknown_key(source, k, known)
    check_worker_keys(inherited, source)
    inherited.pop("backend", None)   # trtllm-serve's --backend (pytorch): the engine kind
    for k in sorted(set(raw) & _DISAGG_IGNORED):
        log.info("%s: %s has no effect on this broker; ignored", source, k)
    style = raw.get("schedule_style", "context_first")
    if style != "context_first":
        raise ConfigError(f"{source}: schedule_style={style!r}: only 'context_first' is supported")
    b = raw.get("broker") or {}
    if not isinstance(b, dict):
        raise ConfigError(f"{source}: broker must be a map, got {b!r}")
    names = {f.name for f in dataclasses.fields(BrokerConfig)}
    for k in b:
        if k not in names:
            raise unknown_key(source, f"broker.{k}", names)
    try:
        broker = BrokerConfig(**b)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None
    port = raw.get("port", 8000)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
        raise ConfigError(f"{source}: port must be an integer in [0, 65535], got {port!r}")
    ctx = _group(raw.get("context_servers"), "context_servers", source, inherited)
    gen = _group(raw.get("generation_servers"), "generation_servers", source, inherited)
    minimum = _cluster_minimum(raw.get("disagg_cluster"), source) or \
        {"context": ctx.num_instances, "generation": gen.num_instances}
    return DisaggConfig(
        hostname=str(raw.get("hostname", "127.0.0.1")), port=port,
        model=str(raw.get("model", "smollm2-135m")), backend=str(raw.get("backend", "pytorch")),
        context_servers=ctx, generation_servers=gen, min_workers=minimum, broker=broker,
        frontend=str(raw.get("frontend", "tcp://127.0.0.1:*")),
        backend_address=str(raw.get("backend_address", "tcp://127.0.0.1:*")),
        source=source,
    )
