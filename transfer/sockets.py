"""ZeroMQ socket settings of the transfer control channel, shared by its two ends.

This module owns only how a channel socket is configured and named; it sends nothing.
"""
from __future__ import annotations

import socket as pysocket

import zmq

from .messages import MAX_MESSAGE_BYTES

HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 1000, 5000


def tune(sock: zmq.Socket) -> zmq.Socket:
    """Options of every channel socket: no linger, ZMTP heartbeats and TCP keepalives (a dead
    or stalled peer is noticed in seconds), and a bound on what a peer may make us allocate."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 10)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 2)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    return sock


def advertised(bound: str, host: str) -> str:
    """The endpoint peers should connect to: a wildcard bind is named by this host's name."""
    if host in ("0.0.0.0", "*", "::"):
        return f"tcp://{pysocket.gethostname()}:{bound.rsplit(':', 1)[1]}"
    return bound
