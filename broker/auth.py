"""Authentication: CURVE key files, the ZAP handler that admits listed keys, the HTTP API key,
and the warning for a socket open beyond loopback without them (docs/architecture.md §9).

Keys are ZeroMQ certificates as ``zmq.auth.create_certificates`` writes them (``NAME.key`` holds
the public key, ``NAME.key_secret`` both). A server (the broker's two ROUTERs, a context
worker's KV channel) gets its key pair and the public keys it admits, by ZAP domain; a client (a
``Client``, the gateway, a worker, a generation worker's KV sink) gets its own pair and the
server's public key. Every error names the file or key and the value. This module imports only
pyzmq and ``broker.config``: every package may use it (transfer/ included).
"""
from __future__ import annotations

import hmac
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Iterable, Optional

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from broker import addresses
from broker.config import ConfigError

log = logging.getLogger("broker.auth")

API_KEY_ENV = "DSRV_API_KEY"            # the HTTP API key when no flag or config sets one
CLIENTS, WORKERS, PEERS = "clients", "workers", "kv-peers"   # ZAP domains
MAX_DENIED_LOGGED = 256                 # distinct denied keys logged at WARNING, then DEBUG


def check_key(key: bytes, what: str) -> bytes:
    """A Z85 CURVE key (40 characters encoding 32 bytes), or ConfigError naming it."""
    try:
        if len(key) == 40 and len(z85.decode(key)) == 32:
            return key
    except (ValueError, KeyError, TypeError):
        pass
    raise ConfigError(f"{what}={key[:48]!r}: not a CURVE key (expected 40 Z85 characters)")


def _read_cert(path: str, what: str) -> tuple[bytes, Optional[bytes]]:
    if not path:
        raise ConfigError(f"{what}: no file given")
    if not os.path.isfile(path):
        raise ConfigError(f"{what}={path!r}: no such key file (write one with `broker keygen`)")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}={path!r}: not a ZeroMQ certificate: {e}") from None
    return check_key(public, f"{what}={path!r}: public-key"), \
        (check_key(secret, f"{what}={path!r}: secret-key") if secret else None)


@dataclass(frozen=True)
class KeyPair:
    public: bytes      # Z85
    secret: bytes
    path: str = ""

    @classmethod
    def load(cls, path: str, what: str = "key pair") -> "KeyPair":
        """The pair in a ``.key_secret`` file; ConfigError naming the file when it is missing,
        holds no secret key, or its keys do not belong together."""
        public, secret = _read_cert(path, what)
        if secret is None:
            raise ConfigError(f"{what}={path!r}: holds no secret-key (give the NAME.key_secret "
                              "file `broker keygen` wrote, not the public NAME.key)")
        if zmq.curve_public(secret) != public:
            raise ConfigError(f"{what}={path!r}: its public-key does not belong to its secret-key")
        return cls(public, secret, path)


def load_public(path: str, what: str = "public key") -> bytes:
    """The public key of a certificate file (``NAME.key`` or ``NAME.key_secret``)."""
    return _read_cert(path, what)[0]


def load_public_dir(path: str, what: str = "key directory") -> frozenset:
    """Every public key in the ``*.key`` files of a directory (none is an error: it would admit
    nobody, which is never what a deployment means)."""
    if not os.path.isdir(path):
        raise ConfigError(f"{what}={path!r}: no such directory of public keys (*.key)")
    keys = {load_public(os.path.join(path, n), f"{what} file") for n in sorted(os.listdir(path))
            if n.endswith(".key")}
    if not keys:
        raise ConfigError(f"{what}={path!r}: holds no NAME.key public key file")
    return frozenset(keys)


def keygen(directory: str, name: str, force: bool = False) -> tuple[str, str]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) in ``directory``; (public, secret) paths."""
    if not name or os.sep in name or name.startswith("."):
        raise ConfigError(f"key name={name!r}: expected a plain file name")
    os.makedirs(directory, exist_ok=True)
    secret = os.path.join(directory, f"{name}.key_secret")
    if os.path.exists(secret) and not force:
        raise ConfigError(f"{secret!r} exists; pass --force to replace it")
    old = os.umask(0o077)            # the secret file is never readable by others, not even briefly
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return public, secret


def public_file(path: str) -> str:
    """The public ``NAME.key`` beside a ``NAME.key_secret`` (to hand a peer), else ``path``."""
    if path.endswith(".key_secret") and os.path.isfile(path[:-7]):
        return path[:-7]
    return path


# ---------------------------------------------------------------------------------------------
# sockets

@dataclass(frozen=True)
class CurveClient:
    """What a connecting socket needs: its own pair and the server's public key."""
    pair: KeyPair
    server: bytes

    @classmethod
    def load(cls, key_file: str, server_key_file: str, what: str = "--curve-key",
             server_what: str = "--curve-server-key") -> "CurveClient":
        return cls(KeyPair.load(key_file, what), load_public(server_key_file, server_what))

    def apply(self, sock: zmq.Socket) -> zmq.Socket:
        sock.curve_secretkey, sock.curve_publickey = self.pair.secret, self.pair.public
        sock.curve_serverkey = self.server
        return sock

    def refusals(self, sock: zmq.Socket) -> "Refusals":
        """Watch a connected socket for the server refusing this pair (its key not admitted)."""
        return Refusals(sock, self)


class Refusals:
    """A client socket's monitor for refused handshakes: ZeroMQ retries them silently, so a
    worker with an unlisted key would otherwise only see a broker that never answers."""

    def __init__(self, sock: zmq.Socket, curve: CurveClient) -> None:
        self.sock, self.curve = sock, curve
        self._mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)

    def explain(self, server: str) -> Optional[str]:
        """What went wrong if the server refused this socket's key since the last call, else None."""
        seen = False
        while self._mon.poll(0):
            self._mon.recv_multipart()
            seen = True
        if not seen:
            return None
        return (f"the server at {server} refused this CURVE key (public key {self.curve.pair.public.decode()} "
                f"of {self.curve.pair.path or 'the given pair'}): list its public NAME.key in the server's "
                "admitted keys, or check the server's public key")

    def close(self) -> None:
        self.sock.disable_monitor()
        self._mon.close(0)


def curve_client(key_file: Optional[str], server_key_file: Optional[str], what: str = "--curve-key",
                 server_what: str = "--curve-server-key") -> Optional[CurveClient]:
    """The CURVE settings of a client from two optional files: both or neither."""
    if not key_file and not server_key_file:
        return None
    if not key_file or not server_key_file:
        given, missing = (what, server_what) if key_file else (server_what, what)
        raise ConfigError(f"{given} is set but {missing} is not: CURVE needs this side's key pair "
                          "and the server's public key")
    return CurveClient.load(key_file, server_key_file, what, server_what)


class _Admit:
    """The ZAP credentials provider of one domain: a set of public keys."""

    def __init__(self, keys: Iterable[bytes], domain: str, denied: set) -> None:
        self.keys, self.domain, self.denied = frozenset(keys), domain, denied

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        level = logging.DEBUG
        if key not in self.denied and len(self.denied) < MAX_DENIED_LOGGED:
            self.denied.add(key)
            level = logging.WARNING
        log.log(level, "refused a %s connection with unlisted CURVE key %s", self.domain, key.decode())
        return False


@dataclass
class CurveServer:
    """A binding side's CURVE: its key pair and, per ZAP domain, the public keys it admits."""
    pair: KeyPair
    admit: dict = field(default_factory=dict)   # domain -> frozenset of Z85 public keys
    _auth: Optional[ThreadAuthenticator] = field(default=None, init=False, repr=False)

    def start(self, ctx: zmq.Context) -> "CurveServer":
        """Start the ZAP handler in ``ctx`` (once per context, before any CURVE socket binds)."""
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("broker.auth.zap"))
        auth.start()
        denied: set = set()
        for domain, keys in self.admit.items():
            auth.configure_curve_callback(domain, _Admit(keys, domain, denied))
        self._auth = auth
        return self

    def apply(self, sock: zmq.Socket, domain: str) -> zmq.Socket:
        if domain not in self.admit:
            raise ValueError(f"ZAP domain {domain!r} has no admitted keys configured")
        sock.zap_domain = domain.encode()
        sock.curve_secretkey, sock.curve_publickey = self.pair.secret, self.pair.public
        sock.curve_server = True
        return sock

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


CONFIG_NAMES = ("auth.curve_key", "auth.client_keys", "auth.worker_keys")


def broker_curve(curve_key: Optional[str], client_keys: Optional[str], worker_keys: Optional[str],
                 names: tuple = CONFIG_NAMES) -> Optional[CurveServer]:
    """The broker's CURVE from its key pair and the two directories of admitted keys (None when
    none is set); ``names``: how errors call the three (config keys or flags). Its own public key
    is admitted as a client too: the HTTP gateway and `broker launch` in its process connect
    with the broker's pair."""
    values = (curve_key, client_keys, worker_keys)
    if not any(values):
        return None
    missing = [n for n, v in zip(names, values) if not v]
    if missing:
        given = ", ".join(f"{n}={v!r}" for n, v in zip(names, values) if v)
        raise ConfigError(f"{given} set but {', '.join(missing)} not: CURVE needs the broker's key "
                          "pair and the directories of admitted client and worker keys")
    pair = KeyPair.load(curve_key, names[0])
    clients = load_public_dir(client_keys, names[1]) | {pair.public}
    return CurveServer(pair, {CLIENTS: clients, WORKERS: load_public_dir(worker_keys, names[2])})


def self_client(server: Optional[CurveServer]) -> Optional[CurveClient]:
    """A client of this server that uses the server's own pair (admitted by ``broker_curve``)."""
    return CurveClient(server.pair, server.pair.public) if server is not None else None


# ---------------------------------------------------------------------------------------------
# exposure and the HTTP API key

_warned = threading.Lock()
_warned_once: list = []


def is_loopback(address: str) -> bool:
    """Whether a ``tcp://HOST:PORT`` (or plain host) address listens on loopback only (a name
    other than localhost, or a wildcard, is not)."""
    if address.startswith(("inproc://", "ipc://")):
        return True
    return addresses.is_loopback(address.split("://", 1)[-1].rsplit(":", 1)[0] if "://" in address else address)


def warn_exposed(addresses: Iterable[str], what: str, fix: str) -> bool:
    """Log one warning (per process) when any of ``addresses`` listens beyond loopback while
    ``what`` is off; returns whether it warned."""
    open_ = [a for a in addresses if a and not is_loopback(a)]
    if not open_:
        return False
    with _warned:
        if what in _warned_once:
            return False
        _warned_once.append(what)
    log.warning("%s listen(s) beyond loopback without %s: anyone who can reach them is served; %s",
                ", ".join(open_), what, fix)
    return True


def api_key_from(flag: Optional[str], config: Optional[str]) -> Optional[str]:
    """The HTTP API key: the flag, else the config's ``auth.api_key``, else $DSRV_API_KEY."""
    key = flag or config or os.environ.get(API_KEY_ENV) or None
    if key is not None and (len(key) < 8 or any(c.isspace() for c in key)):
        raise ConfigError(f"HTTP API key (--api-key, auth.api_key or ${API_KEY_ENV}) of {len(key)} "
                          "characters: expected at least 8 characters and no whitespace")
    return key


def bearer_ok(header: Optional[str], key: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer KEY`` (compared in constant time)."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), key.encode())
