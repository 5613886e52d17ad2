"""Discovery through etcd: the broker publishes its addresses, workers find it and register.

``cluster_uri`` (TensorRT-LLM's ``disagg_cluster`` setting, or ``--disagg-cluster-uri``) is either
``etcd://HOST:PORT`` or the broker's own backend address ``tcp://HOST:PORT`` (one host, no etcd:
a worker then simply connects there). With etcd, keys follow TensorRT-LLM's layout under
``/trtllm-disagg/CLUSTER_NAME/``: ``broker`` holds the broker's frontend, backend and HTTP
addresses (JSON), ``workers/WORKER_ID`` each worker's role, model and broker. Every key lives
under a lease of TTL ``inactive_timeout_sec`` renewed every ``heartbeat_interval_sec``, so a
killed process's key disappears within the TTL; a registration whose lease was lost (etcd down
longer than the TTL, or restarted without its data) is granted a new one and written again.

Workers read the broker's key every heartbeat (polling, no watch: one key, read whole each time,
so there is no read/watch gap to mind) and reconnect when it names another backend address.

The client is etcd's v3 JSON gateway over HTTP (``/v3/kv/put``, ``/v3/kv/range``,
``/v3/lease/...``), standard library only: every call has a deadline and a bounded answer. No
torch, no zmq: workers import this before loading anything heavy.
"""
from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger("discovery")

KEY_ROOT = "/trtllm-disagg"      # TensorRT-LLM's: /trtllm-disagg/{cluster_name}/workers/{worker_id}
MAX_ANSWER_BYTES = 1 << 20       # an etcd answer larger than this is refused
MAX_VALUE_BYTES = 64 << 10       # a registration value larger than this is ignored
CALL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ClusterSettings:
    """``disagg_cluster`` as the broker and workers use it (TensorRT-LLM's defaults)."""
    cluster_uri: Optional[str] = None
    cluster_name: str = "default"
    heartbeat_interval_sec: float = 5.0
    inactive_timeout_sec: float = 10.0

    def check(self, where: str = "disagg_cluster.") -> "ClusterSettings":
        """ValueError naming the setting (``where`` + its name) and its value, for a bad one."""
        if self.cluster_uri:
            parse_cluster_uri(self.cluster_uri, f"{where}cluster_uri")
        if not self.cluster_name or "/" in self.cluster_name:     # keys: KEY_ROOT/NAME/...
            raise ValueError(f"{where}cluster_name={self.cluster_name!r}: expected a non-empty name without '/'")
        if not 0 < self.heartbeat_interval_sec < self.inactive_timeout_sec:
            raise ValueError(f"{where}heartbeat_interval_sec={self.heartbeat_interval_sec!r} must be positive "
                             f"and below {where}inactive_timeout_sec={self.inactive_timeout_sec!r}")
        return self


class EtcdError(RuntimeError):
    """etcd did not answer, or answered an error."""


def parse_cluster_uri(uri: str, name: str = "cluster_uri") -> tuple[str, str]:
    """``("etcd", "HOST:PORT")`` or ``("tcp", "tcp://HOST:PORT")``; ValueError naming ``name``."""
    scheme, sep, rest = uri.partition("://")
    host, _, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in rest or scheme not in ("etcd", "tcp"):
        raise ValueError(f"{name}={uri!r}: expected etcd://HOST:PORT (an etcd server) or "
                         "tcp://HOST:PORT (the broker's backend address, one host without etcd)")
    return scheme, (rest if scheme == "etcd" else uri)


def broker_key(cluster: str) -> str:
    return f"{KEY_ROOT}/{cluster}/broker"


def worker_key(cluster: str, worker_id: str) -> str:
    return f"{KEY_ROOT}/{cluster}/workers/{worker_id}"


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


class Etcd:
    """The few etcd v3 calls discovery needs, through its JSON gateway at ``http://HOST:PORT``."""

    def __init__(self, endpoint: str, timeout: float = CALL_TIMEOUT_S):
        self.endpoint, self.timeout = endpoint, timeout

    def call(self, path: str, body: dict) -> dict:
        """etcd's JSON answer, or an EtcdError saying why there is none within ``timeout`` s in
        all. urllib's own timeout bounds each socket operation but neither the name lookup of an
        ``etcd://HOSTNAME`` nor an answer trickling in, so the call runs in a thread of its own
        and is given up (that thread left to end on its own) at the deadline."""
        req = urllib.request.Request(f"http://{self.endpoint}/v3/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        got: list = []

        def fetch() -> None:
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    got.append(r.read(MAX_ANSWER_BYTES + 1))
            except urllib.error.HTTPError as e:
                detail = e.read(4096).decode(errors="replace")
                got.append(EtcdError(f"etcd {self.endpoint} /v3/{path}: HTTP {e.code}: {detail}"))
            except (OSError, ValueError) as e:      # refused, timed out, reset, no such host
                got.append(EtcdError(f"etcd {self.endpoint} /v3/{path}: {e}"))
            except http.client.HTTPException as e:
                got.append(EtcdError(f"etcd {self.endpoint} /v3/{path}: not an HTTP answer ({e!r})"))
        caller = threading.Thread(target=fetch, name="etcd-call", daemon=True)
        caller.start()
        caller.join(self.timeout)
        if not got:
            raise EtcdError(f"etcd {self.endpoint} /v3/{path}: no answer within {self.timeout:g} s")
        raw = got[0]
        if isinstance(raw, EtcdError):
            raise raw
        if len(raw) > MAX_ANSWER_BYTES:
            raise EtcdError(f"etcd {self.endpoint} /v3/{path}: answer over {MAX_ANSWER_BYTES} bytes")
        try:
            answer = json.loads(raw)
        except ValueError:
            raise EtcdError(f"etcd {self.endpoint} /v3/{path}: not JSON: {raw[:200]!r}") from None
        if not isinstance(answer, dict):
            raise EtcdError(f"etcd {self.endpoint} /v3/{path}: not a JSON object")
        return answer

    def grant(self, ttl: float) -> str:
        return str(self.call("lease/grant", {"TTL": max(1, math.ceil(ttl))})["ID"])   # whole seconds

    def keepalive(self, lease: str) -> int:
        """The lease's renewed TTL; 0 when etcd no longer knows it."""
        result = self.call("lease/keepalive", {"ID": lease}).get("result") or {}
        return int(result.get("TTL") or 0)

    def revoke(self, lease: str) -> None:
        self.call("lease/revoke", {"ID": lease})

    def put(self, key: str, value: str, lease: str = "0") -> None:
        self.call("kv/put", {"key": _b64(key), "value": _b64(value), "lease": lease})

    def range(self, key: str, prefix: bool = False) -> dict:
        """``{key: value}`` of ``key``, or of every key under it with ``prefix``."""
        body = {"key": _b64(key)}
        if prefix:
            end = key.encode()[:-1] + bytes([key.encode()[-1] + 1])
            body["range_end"] = base64.b64encode(end).decode()
        kvs = self.call("kv/range", body).get("kvs") or []
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
                for kv in kvs}

    def get_json(self, key: str) -> Optional[dict]:
        """The JSON object at ``key``, or None (absent, too large or not an object)."""
        raw = self.range(key).get(key)
        if raw is None or len(raw) > MAX_VALUE_BYTES:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


class Registration:
    """``key`` = ``value`` in etcd under a lease of ``ttl`` seconds, renewed every ``interval``
    from a daemon thread; written again under a new lease whenever the lease is lost, and
    revoked (the key gone at once) by ``close()``. ``on_tick`` runs after each renewal attempt."""

    def __init__(self, etcd: Etcd, key: str, value: dict, ttl: float, interval: float,
                 on_tick: Optional[Callable[[], None]] = None):
        if not 0 < interval < ttl:
            raise ValueError(f"heartbeat_interval_sec={interval!r} must be positive and below "
                             f"inactive_timeout_sec={ttl!r}")
        self.etcd, self.key, self.ttl, self.interval = etcd, key, ttl, interval
        self.value = json.dumps(value)
        self.on_tick = on_tick
        self.lease: Optional[str] = None
        self.failing = False
        self._revoked = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"etcd-lease {key}", daemon=True)

    def start(self) -> "Registration":
        self._thread.start()
        return self

    def renew(self) -> None:
        """One renewal (a new lease and the key written when there is none); raises EtcdError."""
        if self.lease is not None and self.etcd.keepalive(self.lease) == 0:
            log.warning("etcd lease of %s expired; registering again", self.key)
            self.lease = None
        if self.lease is None:
            lease = self.etcd.grant(self.ttl)
            self.etcd.put(self.key, self.value, lease)
            self.lease = lease
            log.info("registered %s in etcd %s (lease %s, ttl %g s)", self.key, self.etcd.endpoint,
                     lease, self.ttl)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.renew()
                if self.failing:
                    log.info("etcd %s answers again; %s is registered", self.etcd.endpoint, self.key)
                self.failing = False
            except EtcdError as e:
                if not self.failing:
                    log.warning("cannot renew %s: %s; retrying every %g s", self.key, e, self.interval)
                self.failing = True
            except (KeyError, TypeError, ValueError) as e:
                log.warning("unexpected answer from etcd %s for %s: %r", self.etcd.endpoint, self.key, e)
            if self.on_tick is not None:
                self.on_tick()
            self._stop.wait(self.interval)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval + 2 * self.etcd.timeout)
        if self.lease is not None and not self._revoked:     # once: close() may be called twice
            self._revoked = True
            try:
                self.etcd.revoke(self.lease)
            except EtcdError:
                pass      # it expires within the TTL anyway


def register_broker(settings: ClusterSettings, frontend: str, backend: str,
                    http: Optional[str]) -> Optional[Registration]:
    """The broker's registration, for an ``etcd://`` cluster URI (None for ``tcp://`` or none).
    The addresses are published as given: the caller passes them advertised
    (``broker.addresses.broker_advertised``), never a wildcard bind."""
    if not settings.cluster_uri:
        return None
    kind, target = parse_cluster_uri(settings.cluster_uri)
    if kind != "etcd":
        return None
    value = {"frontend": frontend, "backend": backend, "http": http,
             "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    return Registration(Etcd(target), broker_key(settings.cluster_name), value,
                        settings.inactive_timeout_sec, settings.heartbeat_interval_sec).start()


def find_broker(uri: str, cluster_name: str = "default", which: str = "frontend", timeout: float = 0.0) -> str:
    """The address a broker is reached at: ``uri`` itself unless it is ``etcd://HOST:PORT``; then
    the ``which`` address ("frontend" for clients, "backend" for workers) that the broker of
    ``cluster_name`` publishes there, waiting up to ``timeout`` s for one. LookupError, naming
    the key (and etcd's error, if it failed), when there is none."""
    if not uri.startswith("etcd://"):
        return uri
    try:
        _, target = parse_cluster_uri(uri)
    except ValueError:      # its message offers tcp:// as the backend: here tcp:// is taken as it is
        raise ValueError(f"address={uri!r}: expected etcd://HOST:PORT (an etcd server)") from None
    etcd, key = Etcd(target), broker_key(cluster_name)
    deadline = time.monotonic() + timeout
    while True:
        address, error = _published(etcd, key, which)
        if address is not None:
            return address
        if time.monotonic() >= deadline:
            raise LookupError(f"no broker registered in etcd {target} under {key} (cluster {cluster_name!r})"
                              + (f" after {timeout:g} s" if timeout > 0 else "") + (f": {error}" if error else ""))
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _published(etcd: Etcd, key: str, which: str) -> tuple[Optional[str], Optional[str]]:
    """(the ``which`` tcp:// address the broker's ``key`` names, or None; etcd's error, or None)."""
    try:
        value = etcd.get_json(key)
    except EtcdError as e:
        return None, str(e)
    address = value.get(which) if value else None
    return (address if isinstance(address, str) and address.startswith("tcp://") else None), None


class WorkerLink:
    """A worker's side of discovery: finds the broker's backend address in etcd, keeps it
    current (``address``, read every heartbeat) and keeps the worker registered."""

    def __init__(self, settings: ClusterSettings, worker_id: str, info: dict):
        kind, target = parse_cluster_uri(settings.cluster_uri or "", "--disagg-cluster-uri")
        if kind != "etcd":
            raise ValueError(f"--disagg-cluster-uri={settings.cluster_uri!r}: not an etcd:// URI")
        self.settings, self.etcd = settings, Etcd(target)
        self.address: Optional[str] = None
        self.error: Optional[str] = None      # why the last read failed, if it did
        self._key = broker_key(settings.cluster_name)
        self._reg = Registration(self.etcd, worker_key(settings.cluster_name, worker_id), info,
                                 settings.inactive_timeout_sec, settings.heartbeat_interval_sec,
                                 on_tick=self._read)

    def _read(self) -> None:
        backend, self.error = _published(self.etcd, self._key, "backend")
        if backend is not None and backend != self.address:   # on an error: keep the address we have
            log.info("broker of cluster %r in etcd: %s", self.settings.cluster_name, backend)
            self.address = backend

    def wait_broker(self, timeout: float, progress_every: float = 5.0) -> str:
        """Until the broker's key names a backend address; TimeoutError after ``timeout`` s."""
        start = time.monotonic()
        said = start
        while True:
            self._read()
            if self.address is not None:
                return self.address
            now = time.monotonic()
            if now - start >= timeout:
                raise TimeoutError(f"no broker registered in etcd {self.etcd.endpoint} under "
                                   f"{self._key} after {timeout:g} s (--discovery-timeout)")
            if now - said >= progress_every:
                log.info("waiting for a broker in etcd %s under %s (%.0f s so far%s)", self.etcd.endpoint,
                         self._key, now - start, f"; {self.error}" if self.error else "")
                said = now
            time.sleep(min(0.5, self.settings.heartbeat_interval_sec))

    def start(self) -> "WorkerLink":
        self._reg.start()
        return self

    def close(self) -> None:
        self._reg.close()
