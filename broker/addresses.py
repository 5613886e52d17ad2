"""Bind addresses and advertised addresses: where a socket listens, and what its peers are told.

Every listening socket has both. The bind address may be a wildcard (``0.0.0.0``, ``*``, ``::``:
every interface of this host); the advertised one is what goes to others (etcd, KV handles, the
workers ``broker launch`` starts) and must be reachable from their hosts. The rules, one place:

* An explicit advertise host (``--advertise-host``) is always what is advertised.
* Otherwise a specific bind address is advertised as it is, and a wildcard becomes, for the
  broker, the config's ``hostname`` when that is a specific non-loopback address, else this
  host's address on its default route (``default_address``), else its fully qualified name.
* A worker's KV endpoints with no ``--host`` bind to, and advertise, this host's address on the
  route toward the broker (the etcd server when found through etcd): ``127.0.0.1`` when the broker
  is on loopback, so one host needs nothing set, and the address the broker's host reaches this
  one at otherwise (``route_address``). With a wildcard ``--host`` that same address is advertised.

Standard library only, no sockets kept open: the broker, the workers' command line and
``transfer/`` all use it.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Optional

WILDCARDS = ("0.0.0.0", "*", "::", "")
# documentation networks (RFC 5737, RFC 3849): a default route covers them, nothing answers there,
# and a UDP connect() to them sends nothing
_PROBES = ("192.0.2.1", "2001:db8::1")


def split(address: str) -> tuple[str, str, str]:
    """``tcp://HOST:PORT`` (``[V6]`` allowed) as ``("tcp", "HOST", "PORT")``; ValueError else."""
    scheme, sep, rest = address.partition("://")
    host, colon, port = rest.rpartition(":")
    if not sep or not colon:
        raise ValueError(f"{address!r}: expected SCHEME://HOST:PORT")
    return scheme, host[1:-1] if host.startswith("[") and host.endswith("]") else host, port


def join(scheme: str, host: str, port: str) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def is_wildcard(host: Optional[str]) -> bool:
    return host is None or host.strip("[]") in WILDCARDS


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def route_address(host: str) -> str:
    """This host's address on the route toward ``host``: the source address the kernel picks for
    a packet to it (a UDP socket connected there; nothing is sent). ``127.0.0.1`` for a wildcard
    or loopback ``host`` (a broker on this host). OSError naming ``host`` when it cannot be
    resolved or no route leads there."""
    host = host.strip("[]")
    if is_wildcard(host) or is_loopback(host):
        return "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    except OSError as e:
        raise OSError(f"cannot resolve {host!r}: {e}") from None
    why: Optional[OSError] = None
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(sockaddr)
                return s.getsockname()[0].split("%", 1)[0]
        except OSError as e:
            why = e
    raise OSError(f"no route from this host to {host!r}: {why}")


def default_address() -> str:
    """This host's address toward the rest of the network: the source address of its default
    route (IPv4, else IPv6), else its fully qualified name (which may resolve to a loopback
    address on a Debian-style /etc/hosts: set --advertise-host there)."""
    for probe in _PROBES:
        try:
            addr = route_address(probe)
        except OSError:
            continue
        if not is_loopback(addr):
            return addr
    return socket.getfqdn()


def advertised(address: str, host: Optional[str] = None, wildcard: Optional[str] = None) -> str:
    """A bound ``SCHEME://HOST:PORT`` as peers should reach it: at ``host`` (an advertise host)
    when given; else as bound, unless bound to a wildcard, which becomes ``wildcard`` or else
    ``default_address()``. Anything that is not ``SCHEME://HOST:PORT`` (``inproc://``,
    ``ipc://``) is returned as is."""
    try:
        scheme, bound, port = split(address)
    except ValueError:
        return address
    if host:
        return join(scheme, host, port)
    return join(scheme, wildcard or default_address(), port) if is_wildcard(bound) else address


def broker_advertised(address: str, flag: Optional[str], hostname: Optional[str]) -> str:
    """One of the broker's bound addresses as it is advertised: ``advertised`` at ``flag``
    (``--advertise-host``), a wildcard bind at the config's ``hostname`` when that is a specific,
    non-loopback address."""
    named = hostname if hostname and not is_wildcard(hostname) and not is_loopback(hostname) else None
    return advertised(address, flag, named)


def broker_published(frontend: str, backend: str, http: Optional[str], flag: Optional[str],
                     hostname: Optional[str]) -> tuple:
    """``(frontend, backend, http)`` of a broker as it advertises them (``broker_advertised``)."""
    return tuple(a if a is None else broker_advertised(a, flag, hostname) for a in (frontend, backend, http))


def worker_transfer_hosts(target: str, host: Optional[str] = None,
                          advertise: Optional[str] = None) -> tuple[str, str]:
    """``(bind, advertise)`` of a worker's KV transfer endpoints. ``target``: where it finds the
    broker (``--broker`` or ``--disagg-cluster-uri``: ``tcp://`` or ``etcd://HOST:PORT``).

    ``host`` (``--host``) binds there; without it, this host's address on the route toward
    ``target``'s host (``route_address``). ``advertise`` (``--advertise-host``) is advertised;
    without it, the bind address, or for a wildcard bind the route address. OSError naming the
    flags to set when no address toward the broker can be found."""
    def toward() -> str:
        try:
            return route_address(split(target)[1])
        except (OSError, ValueError) as e:
            raise OSError(f"cannot find this host's address toward the broker ({target}): {e}; "
                          "give the worker --host (and --advertise-host where peers reach it at "
                          "another address)") from None
    bind = host or toward()
    if advertise:
        return bind, advertise
    return bind, toward() if is_wildcard(bind) else bind
