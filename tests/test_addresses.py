"""Bind and advertised addresses (broker/addresses.py): the rules for the broker's sockets, the
workers' KV endpoints and UCX's interface, on this host alone. tests/test_netns.py runs them
across three network namespaces."""
from __future__ import annotations

import pytest

from broker import addresses as a
from broker.config import parse_disagg_config
from broker.launch import Launch
from transfer import sockets
from transfer.config import CacheTransceiverConfig
from transfer.loopback import fill_pool
from transfer.base import KvLayout
from transfer.registry import create_source
from workers import cli as worker_cli

pytestmark = pytest.mark.timeout(60)


def test_split_and_join_keep_ipv6_brackets():
    assert a.split("tcp://[::1]:5555") == ("tcp", "::1", "5555")
    assert a.join("tcp", "::1", "5555") == "tcp://[::1]:5555"
    assert a.split("http://10.0.0.1:80") == ("http", "10.0.0.1", "80")


def test_a_worker_toward_a_loopback_broker_stays_on_loopback():
    for target in ("tcp://127.0.0.1:5556", "tcp://localhost:5556", "tcp://0.0.0.0:5556",
                   "etcd://127.0.0.1:2379"):
        assert a.worker_transfer_hosts(target) == ("127.0.0.1", "127.0.0.1"), target


def test_a_worker_toward_a_remote_broker_binds_and_advertises_its_route_address(monkeypatch):
    # the kernel's answer stood in for (the real routes: tests/test_netns.py)
    asked = []
    monkeypatch.setattr(a, "route_address", lambda host: asked.append(host) or "10.0.0.2")
    assert a.worker_transfer_hosts("etcd://10.0.0.1:2379") == ("10.0.0.2", "10.0.0.2")
    assert a.worker_transfer_hosts("tcp://broker.example:5556", "0.0.0.0") == ("0.0.0.0", "10.0.0.2")
    assert asked == ["10.0.0.1", "broker.example"]


def test_route_address_is_the_kernels_source_address_and_loopback_for_a_local_broker():
    for host in ("127.0.0.1", "127.0.0.5", "localhost", "::1", "0.0.0.0", "*"):
        assert a.route_address(host) == "127.0.0.1", host


def test_explicit_flags_win():
    assert a.worker_transfer_hosts("tcp://127.0.0.1:1", "10.0.0.2") == ("10.0.0.2", "10.0.0.2")
    assert a.worker_transfer_hosts("tcp://127.0.0.1:1", "0.0.0.0", "10.0.0.2") == ("0.0.0.0", "10.0.0.2")
    assert a.worker_transfer_hosts("tcp://127.0.0.1:1", "10.0.0.2", "1.2.3.4") == ("10.0.0.2", "1.2.3.4")


@pytest.fixture
def no_dns(monkeypatch):
    """Names do not resolve (no resolver is asked: the test needs no network)."""
    import socket

    def refuse(host, *args, **kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(a.socket, "getaddrinfo", refuse)


def test_an_unresolvable_broker_names_the_flags_to_set(no_dns):
    with pytest.raises(OSError, match=r"toward the broker \(tcp://no-such-host\.invalid:5\).*--host"):
        a.worker_transfer_hosts("tcp://no-such-host.invalid:5")
    # an explicit --host needs no route
    assert a.worker_transfer_hosts("tcp://no-such-host.invalid:5", "10.0.0.2") == ("10.0.0.2", "10.0.0.2")


def test_worker_command_line_reports_an_unroutable_broker_before_loading_a_model(no_dns, capsys):
    assert worker_cli.main(["start", "--role", "context", "--broker", "tcp://no-such-host.invalid:5",
                            "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "worker: error: cannot find this host's address toward the broker" in err and "--host" in err


def test_broker_addresses_are_advertised_by_the_rules():
    default = a.default_address()
    # a specific bind is advertised as bound; a wildcard at the config's hostname, unless that
    # is a wildcard or loopback, then at this host's default-route address
    assert a.broker_published("tcp://10.0.0.1:5", "tcp://0.0.0.0:6", "http://0.0.0.0:80", None, "10.9.9.9") == (
        "tcp://10.0.0.1:5", "tcp://10.9.9.9:6", "http://10.9.9.9:80")
    for hostname in ("127.0.0.1", "0.0.0.0", None):
        assert a.broker_published("tcp://0.0.0.0:5", "tcp://[::]:6", None, None, hostname) == (
            a.join("tcp", default, "5"), a.join("tcp", default, "6"), None)
    # --advertise-host is what is advertised, whatever the bind
    assert a.broker_published("tcp://10.0.0.1:5", "tcp://0.0.0.0:6", None, "broker.example", "10.9.9.9") == (
        "tcp://broker.example:5", "tcp://broker.example:6", None)
    assert a.broker_advertised("inproc://x", "h", None) == "inproc://x"


def test_default_address_is_the_default_routes_else_the_fqdn(monkeypatch):
    monkeypatch.setattr(a.socket, "getfqdn", lambda: "this.example")
    monkeypatch.setattr(a, "route_address", lambda host: "10.0.0.2")
    assert a.default_address() == "10.0.0.2"
    monkeypatch.setattr(a, "route_address", lambda host: "127.0.0.1")     # never loopback
    assert a.default_address() == "this.example"

    def unreachable(host):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(a, "route_address", unreachable)
    assert a.default_address() == "this.example"


def test_broker_launch_gives_workers_and_etcd_the_advertised_backend():
    cfg = parse_disagg_config({"hostname": "10.9.9.9", "frontend": "tcp://0.0.0.0:0",
                               "backend_address": "tcp://0.0.0.0:0", "model": "tiny"})
    session = Launch(cfg, http=False)
    try:
        front, back, http = session.advertised()
        assert front == f"tcp://10.9.9.9:{session.frontend.rsplit(':', 1)[1]}"
        assert back == f"tcp://10.9.9.9:{session.server.backend.rsplit(':', 1)[1]}" and http is None
        session.advertise_host = "broker.example"
        assert session.advertised()[1].startswith("tcp://broker.example:")
    finally:
        session.server.close()
        session.children.close()


def test_a_kv_source_bound_to_every_interface_advertises_the_given_host():
    lay = KvLayout(2, 2, 8, "float32", 4)
    src = create_source(CacheTransceiverConfig(backend="ZMQ"), fill_pool(lay, 4, 1), lay,
                        host="0.0.0.0", advertise="10.0.0.2")
    try:
        port = src.bound.rsplit(":", 1)[1]
        assert src.bound.startswith("tcp://0.0.0.0:") and src.endpoint == f"tcp://10.0.0.2:{port}"
        assert src.register("t", [0], 4)["endpoint"] == src.endpoint
    finally:
        src.close()
    src = create_source(CacheTransceiverConfig(backend="ZMQ"), fill_pool(lay, 4, 1), lay, host="0.0.0.0")
    try:
        assert src.endpoint.startswith(a.join("tcp", a.default_address(), ""))
    finally:
        src.close()


def test_ucx_is_confined_to_the_bind_interface_or_a_local_advertise_address(monkeypatch):
    monkeypatch.delenv(sockets.UCX_DEVICES_ENV, raising=False)
    assert sockets.confine_ucx("0.0.0.0") is None
    assert sockets.confine_ucx("0.0.0.0", "203.0.113.9") is None      # not this host's: every interface
    assert sockets.confine_ucx("0.0.0.0", "127.0.0.1") == "lo"
    monkeypatch.delenv(sockets.UCX_DEVICES_ENV)
    assert sockets.confine_ucx("127.0.0.1", "203.0.113.9") == "lo"
    monkeypatch.setenv(sockets.UCX_DEVICES_ENV, "eth9")                # the user's choice stays
    assert sockets.confine_ucx("127.0.0.1") == "eth9"
