"""Following a broker through etcd: when a client given ``etcd://HOST:PORT`` reads the broker's
key again, and what it does with the answer.

Shared by ``Client`` and ``AsyncClient``. The decisions are pure (the time is handed in); the
lookup is one blocking etcd read (``broker_address`` with no waiting: one HTTP call under etcd's
call deadline, broker/discovery.py), which the async client runs off its event loop. Every request
resuming while its broker is away asks to follow it, so a client with many in flight would read
etcd in a storm; instead one lookup runs at a time, and the next starts no sooner than ``every``
seconds after the last ended. A request that finds a lookup running waits for it (async); one
that finds a recent one keeps its result: the client already moved where it pointed.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import zmq

from .errors import ClientError
from .request import broker_address

log = logging.getLogger(__name__)

FOLLOW_EVERY_S = 0.5     # the least time between the end of one etcd lookup and the next


class Follow:
    """``etcd``: the client's ``etcd://HOST:PORT`` address, or None (a fixed ``tcp://``: never
    looks up)."""

    def __init__(self, etcd: Optional[str], cluster_name: str, every: float = FOLLOW_EVERY_S) -> None:
        self.etcd = etcd
        self.cluster_name = cluster_name
        self.every = every
        self.running = False
        self.ended = -math.inf       # when the last lookup ended

    def start(self, now: float) -> bool:
        """Whether to look up now (then counted as running until ``end``)."""
        if self.etcd is None or self.running or now - self.ended < self.every:
            return False
        self.running = True
        return True

    def lookup(self) -> Optional[str]:
        """Blocking: the frontend the broker's key names now; None when etcd is away or names none."""
        assert self.etcd is not None
        try:
            return broker_address(self.etcd, self.cluster_name, 0.0)
        except ClientError:
            return None
        except Exception as e:     # an answer of a shape discovery did not expect: keep our address
            log.warning("etcd lookup of the broker failed: %r", e)
            return None

    def end(self, now: float, found: Optional[str], current: str) -> Optional[str]:
        """The lookup ``start`` allowed found ``found``: the address to move to, if it moved."""
        self.running = False
        self.ended = now
        if found is None or found == current:
            return None
        log.warning("etcd names a new broker frontend %s (was %s); connecting there", found, current)
        return found


def move(sock: Any, current: str, new: str) -> str:
    """Connect ``sock`` (a DEALER, sync or asyncio) to ``new`` instead of ``current``; the address
    it is connected to afterwards (``current`` when ``new`` cannot be connected to)."""
    try:
        sock.connect(new)
    except zmq.ZMQError as e:
        log.warning("cannot connect to the broker frontend %r that etcd names: %s; staying at %s",
                    new, e, current)
        return current
    sock.disconnect(current)
    return new
