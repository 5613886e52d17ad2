"""The control channel every transfer backend shares; a backend is only its data plane.

A backend is a data plane (``planes.py``: how the bytes move: NIXL one-sided reads, SHM copies,
UCX or MPI tagged messages, ZeroMQ frames) under one control channel (start, rounds, done,
expiry; the messages are in ``messages.py``). The channel's two ends are
``channel_source.ChannelSource`` (context side: a ROUTER served by one background thread, which
also drives the source's plane) and ``channel_sink.ChannelSink`` (generation side: no thread; its
``poll()`` advances every pull one step, so the worker loop's iteration is the progress loop:
NIXL and UCXX then need no progress thread of their own, which halves bandwidth on 2 cores).

``channel_backend`` turns a pair of planes into the ``make_source``/``make_sink`` that the
registry calls. This module never knows a particular backend.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .base import KvLayout, KvSink, KvSource
from .channel_sink import ChannelSink
from .channel_source import ChannelSource
from .config import CacheTransceiverConfig
from .planes import SinkPlane, SourcePlane


def channel_backend(backend: str, source_plane: Callable[[torch.Tensor], SourcePlane],
                    sink_plane: Callable[[torch.Tensor], SinkPlane],
                    devices: tuple = ("cpu",)) -> tuple:
    """``(make_source, make_sink)`` of a backend: the channel over these planes, for pools on
    ``devices``."""

    def make_source(cfg: CacheTransceiverConfig, pool: torch.Tensor, layout: KvLayout, *,
                    host: str = "127.0.0.1", curve=None, advertise: Optional[str] = None) -> KvSource:
        return ChannelSource(cfg, pool, layout, backend, source_plane, devices, host=host, curve=curve,
                             advertise=advertise)

    def make_sink(cfg: CacheTransceiverConfig, pool: torch.Tensor, layout: KvLayout, curve=None) -> KvSink:
        return ChannelSink(cfg, pool, layout, backend, sink_plane, devices, curve=curve)

    return make_source, make_sink
