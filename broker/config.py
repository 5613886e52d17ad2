"""Broker settings, the reader of TensorRT-LLM's ``disagg_config.yaml`` (kept compatible), and the
one way every configuration file of the project is checked: pydantic models with
``extra="forbid"`` whose errors become one ``ConfigError`` naming the file, the dotted key and the
value.

A key we accept is honoured, or logged once at startup as not supported, with the reason: the
reasons live in ``broker/config_notices.py`` (the ``*_NOT_SUPPORTED`` tables). This module does no I/O beyond reading
the config files it is given (and the worker options file a server group names). It never imports
torch, workers/ or transfer/ (transfer/ and workers/ import it for ``ConfigError``).
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pydantic
import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, TypeAdapter, ValidationError, create_model,
                      field_validator)
from pydantic_core import ArgsKwargs

from broker.config_notices import (DISAGG_NOT_SUPPORTED, GROUP_NOT_SUPPORTED, KV_NOT_SUPPORTED,
                                   NO_INDUCTOR, TORCH_COMPILE_NOT_SUPPORTED, WORKER_NOT_SUPPORTED,
                                   log_not_supported)
from broker.discovery import ClusterSettings

log = logging.getLogger("broker.config")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the file, the dotted key and the
    value. The one error type of every configuration file (``transfer.config`` re-exports it)."""


# strict: YAML's "4096" is not a number and `true` is not 1; NaN is never a setting
MAX_INT = 2**31 - 1       # every count and size here fits a signed 32-bit integer
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, protected_namespaces=())


class Schema(BaseModel):
    """Base of the file schemas: unknown keys are errors, values are not coerced."""
    model_config = ConfigDict(**STRICT, frozen=True)


def dotted(loc: tuple) -> str:
    """A pydantic error location as a dotted key: ``("context_servers", "urls", 0)`` ->
    ``context_servers.urls[0]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(tp: Any, loc: tuple) -> Any:
    """The schema class reached by following ``loc`` from ``tp`` (None where it stops being one)."""
    for part in loc:
        fields = getattr(tp, "model_fields", None) or getattr(tp, "__pydantic_fields__", None)
        if fields is None or part not in fields:
            return None
        tp = fields[part].annotation
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is not None and len(args) == 1:     # Optional[Model]
            tp = args[0]
    return tp


def known_keys(tp: Any) -> set:
    """The keys a schema (model or pydantic dataclass) takes from a file."""
    fields = getattr(tp, "model_fields", None) or getattr(tp, "__pydantic_fields__", None) or {}
    return {k for k in fields if k not in getattr(tp, "_not_keys", ())}


def unknown_key(where: str, key: str, known: set, value: Any = None) -> ConfigError:
    """The error for an unknown key: the file, the dotted key, its value, the closest known spelling."""
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, sorted(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{where}: unknown key '{key}' (value {value!r}); {hint}known: {', '.join(sorted(known))}")


def config_error(e: ValidationError, schema: Any, where: str, prefix: str = "") -> ConfigError:
    """pydantic's first error as a ``ConfigError``: ``FILE: dotted.key=VALUE: what was expected``.
    ``prefix`` is the dotted key of the section ``schema`` was checked at."""
    err = e.errors(include_url=False)[0]
    key = (prefix + dotted(err["loc"])).rstrip(".")
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return unknown_key(where, key, known_keys(_model_at(schema, err["loc"][:-1])), err["input"])
    msg = {"value_error": lambda: str(err["ctx"]["error"]), "model_type": lambda: "expected a map",
           "dict_type": lambda: "expected a map"}.get(err["type"], lambda: err["msg"])()
    value = err["input"]
    shown = repr(value) if not isinstance(value, dict) or len(repr(value)) < 120 else "{...}"
    return ConfigError(f"{where}: {key}={shown}: {msg}" if key else f"{where}: {msg}")


def validated(schema: Any, data: Any, where: str, prefix: str = "") -> Any:
    """``data`` checked against ``schema`` (a model or a pydantic dataclass); ConfigError if it is not."""
    try:
        if not pydantic.dataclasses.is_pydantic_dataclass(schema):
            return TypeAdapter(schema).validate_python(data)
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: {prefix.rstrip('.') or 'settings'}={data!r}: expected a map")
        obj = object.__new__(schema)   # strict dataclasses take keyword arguments, as their constructor does
        schema.__pydantic_validator__.validate_python(ArgsKwargs((), data), self_instance=obj)
        return obj
    except ValidationError as e:
        raise config_error(e, schema, where, prefix) from None


def checked_dataclass(where: str):
    """A frozen pydantic dataclass whose constructor raises ``ConfigError`` (naming ``where``) instead
    of pydantic's error, so ``dataclasses.replace`` with a bad flag value reads like a bad key."""
    def wrap(cls):
        cls = pydantic.dataclasses.dataclass(frozen=True, config=STRICT)(cls)
        init = cls.__init__

        def __init__(self, *args, **kwargs):
            try:
                init(self, *args, **kwargs)
            except ValidationError as e:
                raise config_error(e, cls, kwargs.get("where", where)) from None
        __init__.__doc__ = init.__doc__
        cls.__init__ = __init__
        return cls
    return wrap


@checked_dataclass("broker settings")
class BrokerConfig:
    heartbeat_interval_s: float = Field(1.0, gt=0)   # broker -> worker heartbeats
    liveness: int = Field(3, ge=1, le=MAX_INT)                    # missed worker intervals before a worker is expired
    max_queue: int = Field(1024, ge=1, le=MAX_INT)                # queued requests past which Submit gets OVERLOADED
    request_timeout_s: float = Field(600.0, gt=0)     # deadline of a request that gives none
    kv_lease_s: float = Field(30.0, gt=0)             # how long a context worker holds KV waiting for the pull
    max_attempts: int = Field(3, ge=1, le=MAX_INT)                # prefill attempts (worker deaths, retryable failures)
    # ZMQ_MAXMSGSIZE of both sockets; the default is broker.protocol.MAX_MESSAGE_BYTES (this module
    # imports only pydantic and PyYAML: test_protocol checks that the two agree)
    max_message_bytes: int = Field(8 << 20, ge=1 << 16, le=1 << 30)
    max_workers: int = Field(1024, ge=1, le=MAX_INT)              # registered workers at most
    max_migrations: int = Field(3, ge=0, le=MAX_INT)              # moves of a stream whose generating worker died (0: off)
    # the model a request naming none runs on when several are up ("": the first registered; broker/pool.py)
    default_model: str = Field("", max_length=256)


# ---------------------------------------------------------------------------------------------
# The schemas. Engine keys (the worker's extra options YAML and the per-group keys of
# disagg_config.yaml) have None defaults: the worker's own defaults (workers/options.py) apply.

PositiveInt = Optional[typing.Annotated[int, Field(ge=1, le=MAX_INT)]]


KV_DTYPES = ("auto", "float32", "bfloat16", "float16")   # auto: the model's compute dtype


class TorchCompileSchema(Schema):
    """TensorRT-LLM's ``torch_compile_config`` keys (``TorchCompileConfig``), with its defaults."""
    enable_fullgraph: StrictBool = True        # one graph or an error (no silent graph breaks)
    enable_inductor: StrictBool = True         # TensorRT-LLM defaults to false; here always inductor
    enable_piecewise_cuda_graph: StrictBool = False
    # the decode batch sizes compiled and run before the worker registers (TensorRT-LLM: the token
    # counts its piecewise CUDA graphs are captured for; a decode step's tokens are its batch)
    capture_num_tokens: Optional[list[typing.Annotated[int, Field(ge=1, le=MAX_INT)]]] = None
    enable_userbuffers: StrictBool = True
    max_num_streams: typing.Annotated[int, Field(ge=1, le=MAX_INT)] = 1


class _KvKeys(Schema):
    max_tokens: PositiveInt = None
    tokens_per_block: PositiveInt = None
    dtype: Optional[str] = None
    # on a GPU: the pool takes this fraction of the memory free after the model loaded
    free_gpu_memory_fraction: Optional[typing.Annotated[float, Field(gt=0, le=1)]] = None
    enable_block_reuse: Optional[StrictBool] = None    # prefix caching; on by default

    @field_validator("dtype")
    @classmethod
    def _storable(cls, v: Optional[str]) -> Optional[str]:
        # TensorRT-LLM also takes fp8 (and nvfp4): refused, never stored as something else
        if v is not None and v not in KV_DTYPES:
            raise ValueError(f"expected one of {', '.join(KV_DTYPES)} (this engine cannot store "
                             f"a KV cache in {v!r})")
        return v


KvCacheSchema = create_model("KvCacheSchema", __base__=_KvKeys,
                             **{k: (Any, None) for k in KV_NOT_SUPPORTED})


# the ranges a worker's Ready must respect (broker.protocol.MAX_SLOTS, MIN_/MAX_HEARTBEAT_MS;
# test_protocol checks that they agree): a worker option outside them is an error at start-up
MAX_SLOTS, MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS = 1 << 20, 10, 60_000


class _EngineKeys(Schema):
    max_batch_size: Optional[typing.Annotated[int, Field(ge=1, le=MAX_SLOTS)]] = None
    max_num_tokens: PositiveInt = None
    max_seq_len: PositiveInt = None
    tokens_per_block: PositiveInt = None
    kv_cache_config: Optional[KvCacheSchema] = None
    # present (even {}): the decode step runs compiled, compiled and warmed up before registering
    torch_compile_config: Optional[TorchCompileSchema] = None
    # checked by the worker against transfer.config (the broker never imports transfer/)
    cache_transceiver_config: Optional[dict] = None
    # TensorRT-LLM's LLM-API dtype; quantization and device are ours (workers/engine/precision.py)
    dtype: Optional[Literal["auto", "float32", "bfloat16", "float16"]] = None
    quantization: Optional[Literal["auto", "none", "int8", "fp16"]] = None
    device: Optional[str] = None
    num_threads: PositiveInt = None                                   # ours
    heartbeat_ms: Optional[typing.Annotated[int, Field(ge=MIN_HEARTBEAT_MS, le=MAX_HEARTBEAT_MS)]] = None  # ours
    broker_timeout_ms: Optional[typing.Annotated[int, Field(ge=10, le=MAX_INT)]] = None  # ours


EngineOptions = create_model("EngineOptions", __base__=_EngineKeys,
                             **{k: (Any, None) for k in WORKER_NOT_SUPPORTED})


def engine_notices(opts: BaseModel) -> list:
    """(dotted key, reason) of each key set in these engine options that this engine ignores."""
    out = [(k, WORKER_NOT_SUPPORTED[k]) for k in sorted(opts.model_fields_set) if k in WORKER_NOT_SUPPORTED]
    kv = opts.kv_cache_config
    if kv is not None:
        out += [(f"kv_cache_config.{k}", KV_NOT_SUPPORTED[k]) for k in sorted(kv.model_fields_set)
                if k in KV_NOT_SUPPORTED]
    tc = opts.torch_compile_config
    if tc is not None:
        out += [(f"torch_compile_config.{k}", TORCH_COMPILE_NOT_SUPPORTED[k])
                for k in sorted(tc.model_fields_set) if k in TORCH_COMPILE_NOT_SUPPORTED]
        if not tc.enable_inductor:
            out.append(("torch_compile_config.enable_inductor", NO_INDUCTOR))
    return out


# TensorRT-LLM's router names, each with the options it reads
ROUTER_OPTIONS = {"round_robin": (), "load_balancing": ("use_tokens",), "kv_cache_aware": ("max_batch_size",)}
ROUTERS = tuple(ROUTER_OPTIONS)
# with no router section (why: docs/architecture.md §2, Routing; README, Benchmarks)
DEFAULT_ROUTERS = {"context_servers": "kv_cache_aware", "generation_servers": "load_balancing"}
ROUTER_NOT_SUPPORTED = {   # options TensorRT-LLM's routers read that ours need not
    "tokens_per_block": "the broker hashes a prompt with the block size each worker announces",
    "custom_tokenizer": "the broker never tokenizes (docs/architecture.md §2, Routing)"}


class RouterSchema(BaseModel):
    """A server group's ``router`` (TensorRT-LLM's ``RouterConfig``): ``round_robin``,
    ``load_balancing`` (fewest active requests, or prompt tokens with ``use_tokens``) or
    ``kv_cache_aware`` (longest cached prefix against load, ``max_batch_size`` scaling the load)."""
    model_config = ConfigDict(extra="allow", strict=True)    # router options differ by type
    type: Literal[ROUTERS] = "round_robin"
    use_tokens: StrictBool = False
    max_batch_size: Optional[typing.Annotated[int, Field(ge=1, le=MAX_INT)]] = None
    tokens_per_block: Optional[typing.Annotated[int, Field(ge=1, le=MAX_INT)]] = None


@dataclass(frozen=True)
class RouterSettings:
    """A role's worker selection (``broker/routers.py``)."""
    type: str = DEFAULT_ROUTERS["context_servers"]
    use_tokens: bool = False                  # load_balancing: load is prompt tokens in flight
    max_batch_size: Optional[int] = None      # kv_cache_aware: requests that make a worker "full"
                                              # (None: each worker's own max_batch_size, its slots)


class ConditionalDisaggSchema(Schema):
    # TensorRT-LLM's: prompts whose part not cached on the chosen generation worker is at most
    # this many tokens are prefilled there, skipping the context phase
    max_local_prefill_length: typing.Annotated[int, Field(ge=0, le=MAX_INT)] = 0


@dataclass(frozen=True)
class Routing:
    """Which worker takes each phase (docs/architecture.md §2, Routing): the context servers'
    router (also for `both` workers, which take a request's prefill), the generation servers',
    and conditional disaggregation (None: off)."""
    context: RouterSettings = RouterSettings(DEFAULT_ROUTERS["context_servers"])
    generation: RouterSettings = RouterSettings(DEFAULT_ROUTERS["generation_servers"])
    max_local_prefill_length: Optional[int] = None


class _GroupKeys(Schema):
    num_instances: typing.Annotated[int, Field(ge=0, le=MAX_INT)] = 1
    urls: list[str] = []              # HOST:PORT strings (one string is a list of one)
    router: Optional[RouterSchema] = None
    extra_llm_api_options: Optional[str] = None        # path of the workers' extra options YAML (ours)
    args: list[str] = []              # extra command-line words for each worker (ours; a string is split)

    @field_validator("urls", "args", mode="before")
    @classmethod
    def _words(cls, v: Any, info) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            return [v] if info.field_name == "urls" else v.split()
        if info.field_name == "args" and isinstance(v, list):   # YAML reads `--port 9` as a number
            return [str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in v]
        return v


GroupSchema = create_model("GroupSchema", __base__=_GroupKeys,
                           **{k: (f.annotation, None) for k, f in EngineOptions.model_fields.items()})


class MinimalInstances(Schema):
    context_servers: typing.Annotated[int, Field(ge=0, le=MAX_INT)] = 1
    generation_servers: typing.Annotated[int, Field(ge=0, le=MAX_INT)] = 1


class ClusterSchema(Schema):
    cluster_uri: Optional[str] = None
    cluster_name: Optional[str] = None
    minimal_instances: Optional[MinimalInstances] = None
    heartbeat_interval_sec: Optional[float] = None
    inactive_timeout_sec: Optional[float] = None
    inactive_interval_sec: Optional[float] = None    # TensorRT-LLM's README spells it so; its code does not


class AuthSchema(Schema):
    """Ours: the ``auth`` section (broker/auth.py). Paths are relative to the config's folder."""
    curve_key: Optional[str] = None     # the broker's NAME.key_secret: CURVE on both ZeroMQ sockets
    client_keys: Optional[str] = None   # directory of admitted client public keys (*.key)
    worker_keys: Optional[str] = None   # directory of admitted worker public keys (*.key)
    worker_key: Optional[str] = None    # the key pair `broker launch` gives the workers it starts
    api_key: Optional[str] = None       # HTTP API key (also --api-key, $DSRV_API_KEY)
    metrics_need_key: bool = False      # also ask the API key on /metrics (never on /health)


@dataclass(frozen=True)
class AuthSettings:
    curve_key: Optional[str] = None
    client_keys: Optional[str] = None
    worker_keys: Optional[str] = None
    worker_key: Optional[str] = None
    api_key: Optional[str] = None
    metrics_need_key: bool = False


def _auth(a: Optional[AuthSchema], source: str) -> AuthSettings:
    if a is None:
        return AuthSettings()
    base = os.path.dirname(os.path.abspath(source)) if source not in ("<dict>", "<defaults>") else ""
    # paths only: broker/auth.py checks the keys, after the command line's flags are applied
    paths = {k: os.path.join(base, v) if base and v and not os.path.isabs(v) else v
             for k in ("curve_key", "client_keys", "worker_keys", "worker_key") for v in [getattr(a, k)]}
    return AuthSettings(**paths, api_key=a.api_key, metrics_need_key=a.metrics_need_key)


class _DisaggKeys(Schema):
    hostname: str = "127.0.0.1"
    port: typing.Annotated[int, Field(ge=0, le=65535)] = 8000
    model: str = "smollm2-135m"
    backend: str = "pytorch"            # trtllm-serve's --backend: the engine kind
    context_servers: Optional[GroupSchema] = None
    generation_servers: Optional[GroupSchema] = None
    disagg_cluster: Optional[ClusterSchema] = None
    schedule_style: Literal["context_first"] = "context_first"
    broker: Optional[dict] = None        # ours: BrokerConfig
    frontend: str = "tcp://127.0.0.1:*"          # ours: the client-facing ZeroMQ address
    backend_address: str = "tcp://127.0.0.1:*"   # ours: the worker-facing ZeroMQ address
    auth: Optional[AuthSchema] = None            # ours: CURVE keys and the HTTP API key
    # the finished requests the gateway's /perf_metrics keeps until read (TensorRT-LLM's default, 0,
    # keeps none: ours keeps some)
    perf_metrics_max_requests: typing.Annotated[int, Field(ge=0, le=1_000_000)] = 1000
    triton_chat_template: Literal["auto", "on", "off"] = "auto"   # ours: client/triton.py
    conditional_disagg_config: Optional[ConditionalDisaggSchema] = None


# TensorRT-LLM hands every other top-level key to both groups as an LLM-API option
_INHERITED = {k: (f.annotation, None) for k, f in EngineOptions.model_fields.items()
              if k not in _DisaggKeys.model_fields and k not in DISAGG_NOT_SUPPORTED}
DisaggSchema = create_model("DisaggSchema", __base__=_DisaggKeys, **_INHERITED,
                            **{k: (Any, None) for k in DISAGG_NOT_SUPPORTED})
_GROUP_ONLY = set(_GroupKeys.model_fields)


@dataclass(frozen=True)
class ServerGroup:
    num_instances: int = 1
    urls: tuple = ()
    router: dict = field(default_factory=dict)
    extra_llm_api_options: Optional[str] = None   # path of the workers' extra options YAML (ours)
    args: tuple = ()                              # extra command-line words for each worker (ours)
    options: dict = field(default_factory=dict)   # inline worker options (kv_cache_config, ...)
    inherited: tuple = ()                         # which of them the file sets at its top level


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
    auth: AuthSettings = AuthSettings()         # our addition: CURVE keys and the HTTP API key
    cluster: ClusterSettings = ClusterSettings()  # disagg_cluster: discovery (broker/discovery.py)
    perf_metrics_max_requests: int = 1000       # the gateway's /perf_metrics ring
    triton_chat_template: str = "auto"          # our addition: the gateway's Triton text_input rule
    # with a disagg_cluster section, as TensorRT-LLM: the workers the broker needs up before it
    # accepts requests (minimal_instances, default one of each); None without one
    minimal_instances: Optional[dict] = None
    routing: Routing = Routing()                # the groups' routers, conditional_disagg_config
    source: str = "<defaults>"


def load_disagg_config(path: str) -> DisaggConfig:
    return parse_disagg_config(read_yaml(path, "config"), source=path)


def read_yaml(path: str, what: str) -> Any:
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e


def _group(raw: Any, name: str, source: str, inherited: dict) -> ServerGroup:
    if raw is None:
        return ServerGroup(num_instances=0)
    g = validated(GroupSchema, raw, source, f"{name}.")
    engine = {k: v for k, v in raw.items() if k not in _GROUP_ONLY}
    for k, v in inherited.items():     # TensorRT-LLM: top-level engine keys apply to both groups
        if k in engine and engine[k] != v:
            raise ConfigError(f"{source}: {k} is set at the top level ({v!r}) and in {name} "
                              f"({engine[k]!r}) with different values")
        engine.setdefault(k, v)
    from_top = tuple(sorted(k for k in inherited if k not in raw))
    urls = g.urls
    if urls and len(urls) != g.num_instances:
        raise ConfigError(f"{source}: {name}.urls lists {len(urls)} servers but num_instances is {g.num_instances}")
    if "urls" in g.model_fields_set:   # the worker logs the engine keys it ignores; this one is ours
        log_not_supported(source, f"{name}.urls", GROUP_NOT_SUPPORTED["urls"])
    if g.router is not None:
        _router_notices(g.router, f"{name}.router", source)
    return ServerGroup(num_instances=g.num_instances, urls=tuple(urls),
                       router=dict(raw.get("router") or {}),
                       extra_llm_api_options=g.extra_llm_api_options, args=tuple(g.args),
                       options=engine, inherited=from_top)


def _router_notices(r: RouterSchema, key: str, source: str) -> None:
    """Log each option a router section sets that its router does not read."""
    for opt in sorted((set(r.model_fields_set) | set(r.model_extra or {})) - {"type"}):
        if opt not in ROUTER_OPTIONS[r.type]:
            log_not_supported(source, f"{key}.{opt}", ROUTER_NOT_SUPPORTED.get(opt, (
                f"the {r.type} router has no such option (its options: {', '.join(ROUTER_OPTIONS[r.type]) or 'none'})")))


def router_settings(raw: Optional[dict], group: str) -> RouterSettings:
    """A group's ``router`` section (checked by ``RouterSchema``) as settings; none: the group's
    default (``DEFAULT_ROUTERS``)."""
    if raw is None:
        return RouterSettings(DEFAULT_ROUTERS[group])
    r = RouterSchema.model_validate(raw)
    return RouterSettings(type=r.type, use_tokens=r.use_tokens, max_batch_size=r.max_batch_size)


def _cluster_minimum(c: Optional[ClusterSchema], source: str) -> Optional[dict]:
    if c is None:
        return None
    if c.inactive_interval_sec is not None and c.inactive_timeout_sec is not None \
            and c.inactive_interval_sec != c.inactive_timeout_sec:
        raise ConfigError(f"{source}: disagg_cluster.inactive_interval_sec={c.inactive_interval_sec!r} and "
                          f"disagg_cluster.inactive_timeout_sec={c.inactive_timeout_sec!r} are two spellings "
                          "of one setting and disagree")
    mi = c.minimal_instances or MinimalInstances()       # TensorRT-LLM's defaults: one of each
    return {"context": mi.context_servers, "generation": mi.generation_servers}


def parse_disagg_config(raw: Any, source: str = "<dict>") -> DisaggConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a map at the top level, got {type(raw).__name__}")
    d = validated(DisaggSchema, raw, source)
    inherited = {k: v for k, v in raw.items() if k in _INHERITED}
    for k in sorted(set(raw) & set(DISAGG_NOT_SUPPORTED)):
        log_not_supported(source, k, DISAGG_NOT_SUPPORTED[k])
    if d.backend != "pytorch":
        log_not_supported(source, f"backend={d.backend!r}", "the workers always run this project's own "
                                                           "PyTorch engine (backend: pytorch)")
    broker = validated(BrokerConfig, d.broker or {}, source, "broker.")
    ctx = _group(raw.get("context_servers"), "context_servers", source, inherited)
    gen = _group(raw.get("generation_servers"), "generation_servers", source, inherited)
    cluster_minimum = _cluster_minimum(d.disagg_cluster, source)
    minimum = cluster_minimum or {"context": ctx.num_instances, "generation": gen.num_instances}
    cond = d.conditional_disagg_config
    routers = [router_settings((raw.get(name) or {}).get("router"), name)
               for name in ("context_servers", "generation_servers")]
    routing = Routing(*routers, cond.max_local_prefill_length if cond is not None else None)
    return DisaggConfig(hostname=d.hostname, port=d.port, model=d.model, backend=d.backend,
                        context_servers=ctx, generation_servers=gen, min_workers=minimum, broker=broker,
                        frontend=d.frontend, backend_address=d.backend_address,
                        auth=_auth(d.auth, source), cluster=_cluster(d.disagg_cluster, source),
                        perf_metrics_max_requests=d.perf_metrics_max_requests,
                        triton_chat_template=d.triton_chat_template,
                        minimal_instances=cluster_minimum, routing=routing, source=source)


def _cluster(c: Optional[ClusterSchema], source: str) -> ClusterSettings:
    if c is None:
        return ClusterSettings()
    over = {"cluster_uri": c.cluster_uri, "cluster_name": c.cluster_name,
            "heartbeat_interval_sec": c.heartbeat_interval_sec,
            "inactive_timeout_sec": c.inactive_timeout_sec if c.inactive_timeout_sec is not None
            else c.inactive_interval_sec}
    if (c.cluster_uri or "").startswith(("http://", "https://")):
        log_not_supported(source, f"disagg_cluster.cluster_uri={c.cluster_uri!r}",
                          "workers find the broker through etcd (etcd://HOST:PORT) or at its backend "
                          "address (tcp://HOST:PORT), never over HTTP")
        over["cluster_uri"] = None
    s = dataclasses.replace(ClusterSettings(), **{k: v for k, v in over.items() if v is not None})
    try:
        return s.check()
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


# ---------------------------------------------------------------------------------------------
# What `broker launch` hands a worker of a group

ORIGIN_KEY = "origin"   # ours, in a worker options file broker launch writes: where its keys came from


def group_options_path(cfg: DisaggConfig, group: ServerGroup) -> Optional[str]:
    """The group's own ``extra_llm_api_options`` file, relative paths taken from the config's folder."""
    path = group.extra_llm_api_options
    if path and not os.path.isabs(path) and cfg.source not in ("<dict>", "<defaults>"):
        path = os.path.join(os.path.dirname(os.path.abspath(cfg.source)), path)
    return path


def worker_options(cfg: DisaggConfig, name: str) -> tuple[Optional[str], Optional[dict]]:
    """What each worker of group ``name`` gets: ``(path, None)``, a file to pass as it is (or no
    file at all), or ``(None, document)``, options to write to a file and pass: the group's inline
    keys over its own file's, with an ``origin`` entry so that the worker reports a bad value, and
    logs an ignored key, against ``disagg_config.yaml`` (or the group's file), never against the
    file written for it."""
    group: ServerGroup = getattr(cfg, name)
    path = group_options_path(cfg, group)
    if not group.options:
        return path, None
    base = (read_yaml(path, "worker options") or {}) if path else {}
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: expected a map at the top level, got {type(base).__name__}")
    doc = {k: v for k, v in base.items() if k != ORIGIN_KEY}
    doc.update(group.options)
    doc[ORIGIN_KEY] = {"file": cfg.source, "key": name, "base": path, "top": list(group.inherited),
                       "inline": sorted(set(group.options) - set(group.inherited))}
    return None, doc
