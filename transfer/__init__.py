"""KV-cache transfer between context and generation workers.

A context worker serves its KV blocks through a ``KvSource``; a generation worker pulls them into
its own pool through a ``KvSink``. ``create_source``/``create_sink`` pick the backend named by
``cache_transceiver_config`` (backend modules are imported lazily). This package never talks to
the broker: the KV handle it returns is plain data that the worker forwards.
"""
from .base import (BackendUnavailable, KvLayout, KvSink, KvSource, PullResult, SourceEvent,
                   TransferError, TransferTimeout)
from .config import CacheTransceiverConfig, ConfigError
from .registry import create_sink, create_source, resolve_backend

__all__ = ["BackendUnavailable", "CacheTransceiverConfig", "ConfigError", "KvLayout", "KvSink",
           "KvSource", "PullResult", "SourceEvent", "TransferError", "TransferTimeout",
           "create_sink", "create_source", "resolve_backend"]
