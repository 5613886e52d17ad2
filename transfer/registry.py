"""Backend selection. Backend modules are imported lazily: only the one a worker uses is loaded,
and a backend whose library is missing costs nothing until it is asked for."""
from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import TYPE_CHECKING, Optional

import torch

from .base import BackendUnavailable, KvLayout, KvSink, KvSource
from .config import CacheTransceiverConfig
from .sockets import confine_ucx

if TYPE_CHECKING:
    from broker.auth import CurveServer, KeyPair

log = logging.getLogger(__name__)

# backend -> (module of this package, python module(s) of its library, pip extra)
_BACKENDS = {
    "NIXL": ("transfer.nixl_backend", ("nixl_cu12", "nixl"), "nixl"),
    "UCX": ("transfer.ucx_backend", "ucxx", "ucx"),
    "MPI": ("transfer.mpi_backend", "mpi4py", "mpi"),
    "SHM": ("transfer.shm_backend", None, None),
    "ZMQ": ("transfer.zmq_backend", None, None),
    "FAKE": ("transfer.fake", None, None),
}


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _why_unavailable(name: str) -> str | None:
    """None when the backend can be used here, else what to do about it."""
    ours, library, extra = _BACKENDS[name]
    names = (library,) if isinstance(library, str) else library or ()
    if names and not any(_found(n) for n in names):
        return (f"the {name} transfer backend needs the python module {names[0]!r}, which is not "
                f"installed: pip install 'disagg-serve[{extra}]'")
    if not _found(ours):
        return (f"the {name} transfer backend is not built yet in this version of disagg-serve; "
                f"set cache_transceiver_config.backend: ZMQ")
    return None


def resolve_backend(name: str) -> str:
    """The backend to use for a configured name; DEFAULT is NIXL where it can be used, else ZMQ."""
    key = str(name).upper()
    if key == "DEFAULT":
        why = _why_unavailable("NIXL")
        if why is None:
            return "NIXL"
        log.warning("cache_transceiver_config.backend DEFAULT: NIXL is unavailable (%s); "
                    "falling back to the ZMQ transfer backend", why)
        return "ZMQ"
    if key not in _BACKENDS:
        raise BackendUnavailable(f"unknown transfer backend {name!r}: expected one of "
                                 "DEFAULT, NIXL, UCX, MPI, SHM, ZMQ")
    why = _why_unavailable(key)
    if why is not None:
        raise BackendUnavailable(why)
    return key


def _module(cfg: CacheTransceiverConfig, host: str, advertise: Optional[str] = None):
    """The backend's module; a UCX-based one (NIXL, UCX, and MPI: MPICH here runs over UCX) is
    confined to ``host``'s interface (a wildcard: ``advertise``'s) before its library starts."""
    name = resolve_backend(cfg.backend)
    if name in ("NIXL", "UCX", "MPI"):
        confine_ucx(host, advertise)
    return importlib.import_module(_BACKENDS[name][0])


def create_source(cfg: CacheTransceiverConfig, pool: torch.Tensor, layout: KvLayout, *,
                  host: str = "127.0.0.1", worker_id: str = "", curve: Optional[CurveServer] = None,
                  advertise: Optional[str] = None) -> KvSource:
    """``worker_id``: the context worker it serves; its handles carry it, so that a generation
    worker's error names the worker the KV came from. ``host``: where its channel and data
    plane listen; ``advertise``: the host its handles name (default: ``host``, a wildcard made
    this host's address: ``broker.addresses.advertised``); ``curve``: CURVE on its channel (its pair and
    the peers' keys it admits)."""
    cfg.check_block_size(layout.block_size)
    kw = {"curve": curve} if curve is not None else {}
    source = _module(cfg, host, advertise).make_source(cfg, pool, layout, host=host, advertise=advertise or None, **kw)
    source.worker_id = worker_id
    return source


def create_sink(cfg: CacheTransceiverConfig, pool: torch.Tensor, layout: KvLayout, *,
                worker_id: str = "", host: str = "127.0.0.1", curve: Optional[KeyPair] = None,
                advertise: Optional[str] = None) -> KvSink:
    """``worker_id``: the generation worker it serves, named in its errors; ``host``: the
    worker's bind address (its UCX listens there only; a wildcard: on ``advertise``'s interface
    when that is local); ``curve``: its key pair, for sources that run CURVE."""
    cfg.check_block_size(layout.block_size)
    kw = {"curve": curve} if curve is not None else {}
    sink = _module(cfg, host, advertise).make_sink(cfg, pool, layout, **kw)
    sink.worker_id = worker_id
    return sink
