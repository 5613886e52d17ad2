"""Socket settings of the transfer control channel, shared by its two ends, and where the data
planes may listen.

This module owns only how a channel socket is configured and named, and which network interface
UCX (under NIXL, UCX and MPI) may listen on; it sends nothing.
"""
from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket as pysocket
import struct
from typing import Optional

import zmq

from broker import addresses

from .base import TransferError

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


WILDCARDS = addresses.WILDCARDS
UCX_DEVICES_ENV = "UCX_NET_DEVICES"
_SIOCGIFADDR = 0x8915
log = logging.getLogger(__name__)


def _ipv4_of(name: str) -> Optional[str]:
    with pysocket.socket(pysocket.AF_INET, pysocket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return pysocket.inet_ntoa(raw[20:24])


def _ipv6_names(ip: ipaddress.IPv6Address) -> list:
    try:
        with open("/proc/net/if_inet6") as f:
            return [w[5] for w in (line.split() for line in f)
                    if len(w) >= 6 and ipaddress.IPv6Address(int(w[0], 16)) == ip]
    except OSError:
        return []


def interface_of(host: str) -> str:
    """The name of the network interface that holds ``host``'s address (Linux)."""
    try:
        ip = ipaddress.ip_address(pysocket.gethostbyname(host) if not _is_ip(host) else host)
    except (OSError, ValueError) as exc:
        raise TransferError(f"cannot resolve the worker's --host {host!r}: {exc}") from None
    if ip.version == 6:
        names = _ipv6_names(ip)
    else:
        names = [n for _, n in pysocket.if_nameindex() if _ipv4_of(n) == str(ip)]
    if not names:
        if ip.is_loopback:
            return "lo"
        raise TransferError(f"the worker's --host {host!r} ({ip}) is not an address of any network "
                            "interface of this host")
    return names[0]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def confine_ucx(host: str, advertise: Optional[str] = None) -> Optional[str]:
    """Make UCX listen only on one interface: sets $UCX_NET_DEVICES before UCX starts, unless the
    user set it. That is the interface of ``host`` (the bind address), or for a wildcard ``host``
    the interface of ``advertise`` when that is an address of this host; otherwise (a wildcard
    and no local advertise address, e.g. one behind NAT) every interface, and a startup warning.
    Returns the devices UCX will use (None: all)."""
    if os.environ.get(UCX_DEVICES_ENV):
        return os.environ[UCX_DEVICES_ENV]
    if host in WILDCARDS:
        if not advertise:
            return None
        try:
            name = interface_of(advertise)
        except TransferError:
            log.info("UCX listens on every interface: the worker binds %r and advertises %r, "
                     "which is not an address of this host", host, advertise)
            return None
    else:
        name = interface_of(host)
    os.environ[UCX_DEVICES_ENV] = name
    return name
