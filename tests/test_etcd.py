"""Discovery through etcd (broker/discovery.py) against a real etcd server (Debian's
``etcd-server`` package; install.sh installs it, as root), started by the test on free ports in a
temporary data directory and killed by pid: broker and workers started independently with only the
cluster URI serve requests, follow a broker restart on other ports and ride out an etcd outage; a
killed worker's key goes with its lease. Also the one-host ``tcp://`` cluster URI, without etcd.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from broker.discovery import Etcd, EtcdError, Registration, broker_key, worker_key
from broker.launch import Children, read_line, ready_words, start_broker
from client import Client
from tests.harness import _env, free_port

pytestmark = pytest.mark.timeout(180)

TTL, INTERVAL = 2.0, 0.5      # the leases' inactive_timeout_sec and heartbeat_interval_sec here
LEASE_FLAGS = ["--heartbeat-interval-sec", str(INTERVAL), "--inactive-timeout-sec", str(TTL)]


class EtcdServer:
    """One etcd member on free 127.0.0.1 ports, its data in a temporary directory; ``kill()`` and
    ``start()`` again restart it on the same data and ports."""

    def __init__(self, children: Children):
        self.binary = shutil.which("etcd")
        if self.binary is None:
            pytest.fail("no `etcd` on PATH: install Debian's package (apt-get install etcd-server; "
                        "install.sh does, as root)")
        self.children = children
        self.client, peer = f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        self.uri = f"etcd://{self.client}"
        self.cmd = [self.binary, "--name", "test", "--data-dir", os.path.join(children.tmp.name, "etcd-data"),
                    "--listen-client-urls", f"http://{self.client}", "--advertise-client-urls",
                    f"http://{self.client}", "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"test={peer}"]
        self.api = Etcd(self.client, timeout=1.0)
        self.start()

    def start(self) -> None:
        self.proc = self.children.start("etcd", self.cmd)
        deadline = time.monotonic() + 30
        while True:
            self.children.check_alive([self.proc], "etcd answering")
            try:
                self.api.range("/")
                return
            except EtcdError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd did not answer in 30 s:\n{self.children.tail('etcd')}")
                time.sleep(0.1)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def keys(self, cluster: str) -> set:
        return set(self.api.range(f"/trtllm-disagg/{cluster}/", prefix=True))


@pytest.fixture
def children():
    c = Children(prefix="dsrv-etcd-", env=_env())
    try:
        yield c
    finally:
        c.close(grace=0)


def start_worker(children: Children, name: str, role: str, uri: str, *flags: str):
    """``worker start`` with the cluster URI only (TensorRT-LLM's underscore spellings)."""
    path = os.path.join(children.tmp.name, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"heartbeat_ms": 200, "broker_timeout_ms": 5000, "num_threads": 1, "device": "cpu"}, f)
    return children.start(name, [sys.executable, "-m", "workers.cli", "start", "--server_role", role,
                                 "--disagg_cluster_uri", uri, "--model", "tiny", "--worker-id", name,
                                 "--extra-llm-api-options", path, *flags])


def wait(children: Children, pred, what: str, timeout: float = 60.0):
    """Until ``pred()`` is truthy (its EtcdError retries); fails naming ``what`` with every log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = pred()
            if value:
                return value
        except EtcdError:
            pass
        alive = [p for p in children.procs if p.poll() is None]
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{children.tail(n, 15)}" for n in children.names)
            raise TimeoutError(f"timed out waiting for {what} ({len(alive)} processes alive)\n{logs}")
        time.sleep(0.1)


def serve(frontend: str, n: int = 3) -> list:
    with Client(frontend, timeout=30) as c:
        return [c.generate(token_ids=[(i + j) % 200 + 1 for j in range(12)], max_tokens=5, ignore_eos=True)
                for i in range(n)]


def registered(children: Children, frontend: str, names: set) -> bool:
    from broker.launch import ping
    s = ping(frontend, 2.0)
    return s is not None and names <= {w["worker_id"] for w in s["workers"]}


def test_workers_and_broker_find_each_other_through_etcd_and_survive_restarts(children):
    etcd = EtcdServer(children)
    cluster = "t1"
    common = ["--cluster_name", cluster, *LEASE_FLAGS]
    # a worker first, with no broker anywhere: it registers and waits; one with a short deadline gives up
    start_worker(children, "ctx", "context", etcd.uri, *common)
    wait(children, lambda: worker_key(cluster, "ctx") in etcd.keys(cluster), "the waiting worker's key")
    impatient = start_worker(children, "late", "generation", etcd.uri, "--cluster-name", "nobody",
                             "--discovery-timeout", "1", *LEASE_FLAGS)
    broker = start_broker(children, extra=["--disagg-cluster-uri", etcd.uri, *common])
    start_worker(children, "gen", "generation", etcd.uri, *common)     # and one after the broker
    wait(children, lambda: registered(children, broker["frontend"], {"ctx", "gen"}), "workers registered")
    assert all(len(r.token_ids) == 5 for r in serve(broker["frontend"]))
    assert etcd.keys(cluster) == {broker_key(cluster), worker_key(cluster, "ctx"), worker_key(cluster, "gen")}
    assert etcd.api.get_json(broker_key(cluster))["backend"] == broker["backend"]
    assert impatient.wait(60) != 0
    assert "no broker registered in etcd" in children.tail("late") and "/trtllm-disagg/nobody/broker" \
        in children.tail("late")

    # etcd down for longer than the leases' TTL: requests go on; every key is back afterwards
    done, failures, stop = [], [], threading.Event()

    def load():
        with Client(broker["frontend"], timeout=30) as c:
            while not stop.is_set():
                try:
                    done.append(c.generate(token_ids=[7] * 10, max_tokens=4, ignore_eos=True))
                except Exception as e:      # noqa: BLE001 -- every failure is counted and reported
                    failures.append(e)
    t = threading.Thread(target=load)
    t.start()
    try:
        etcd.kill()
        wait(children, lambda: len(done) >= 3, "requests served while etcd is down")
        time.sleep(TTL + 1)
        etcd.start()
        before = len(done)
        wait(children, lambda: len(done) >= before + 3, "requests served after etcd returns")
    finally:
        stop.set()
        t.join(60)
    assert not failures, failures[:3]
    time.sleep(TTL + 1)           # past a TTL after the return: the keys are renewed, not left over
    wait(children, lambda: etcd.keys(cluster) == {broker_key(cluster), worker_key(cluster, "ctx"),
                                                  worker_key(cluster, "gen")}, "registrations back")

    # the broker killed and a new one started on other ports: the workers follow it
    os.kill(broker["pid"], signal.SIGKILL)
    children.names["broker"].wait(10)
    broker2 = start_broker(children, extra=["--disagg-cluster-uri", etcd.uri, *common])
    assert broker2["backend"] != broker["backend"]
    wait(children, lambda: registered(children, broker2["frontend"], {"ctx", "gen"}), "workers at the new broker")
    assert all(len(r.token_ids) == 5 for r in serve(broker2["frontend"]))
    assert etcd.api.get_json(broker_key(cluster))["backend"] == broker2["backend"]

    # a killed worker's key goes when its lease expires (TTL, plus etcd's expiry check and slack)
    os.kill(children.names["gen"].pid, signal.SIGKILL)
    children.names["gen"].wait(10)
    wait(children, lambda: worker_key(cluster, "gen") not in etcd.keys(cluster), "the killed worker's key gone",
         timeout=TTL + 5)
    assert worker_key(cluster, "ctx") in etcd.keys(cluster)


def test_a_lost_lease_is_granted_anew_and_close_revokes_it(children):
    etcd = EtcdServer(children)
    key = worker_key("unit", "w")
    reg = Registration(etcd.api, key, {"role": "context"}, TTL, INTERVAL).start()
    try:
        wait(children, lambda: reg.lease is not None and key in etcd.keys("unit"), "registered")
        first = reg.lease
        etcd.api.revoke(first)            # as if it expired while etcd was away: the key goes with it
        wait(children, lambda: reg.lease not in (None, first) and key in etcd.keys("unit"), "registered again")
        assert etcd.api.get_json(key) == {"role": "context"}
    finally:
        reg.close()
    assert key not in etcd.keys("unit") and etcd.api.keepalive(reg.lease) == 0


def test_cluster_uri_set_to_the_broker_address_needs_no_etcd(children):
    uri = f"tcp://127.0.0.1:{free_port()}"
    config = os.path.join(children.tmp.name, "disagg.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"disagg_cluster": {"cluster_uri": uri}}, f)
    proc = children.start("broker", [sys.executable, "-m", "broker.cli", "start", "--config", config,
                                     "--frontend", "tcp://127.0.0.1:0", "--no-http"], stdout=subprocess.PIPE)
    broker = ready_words(read_line(proc, 30.0, "ready line"))
    assert broker["backend"] == uri       # the config's cluster URI is where the broker listens
    start_worker(children, "agg", "both", uri)
    wait(children, lambda: registered(children, broker["frontend"], {"agg"}), "worker registered")
    assert all(len(r.token_ids) == 5 for r in serve(broker["frontend"], 2))


@pytest.mark.parametrize("args,words", [
    ([], ["exactly one of --broker", "--disagg-cluster-uri"]),
    (["--broker", "tcp://127.0.0.1:1", "--disagg-cluster-uri", "etcd://h:1"], ["exactly one of --broker"]),
    (["--disagg-cluster-uri", "etcd:/h"], ["--disagg-cluster-uri='etcd:/h'", "etcd://HOST:PORT"]),
    (["--disagg-cluster-uri", "etcd://h:1", "--heartbeat-interval-sec", "3", "--inactive-timeout-sec", "2"],
     ["heartbeat_interval_sec=3.0", "inactive_timeout_sec=2.0"]),
    # a '/' would put one cluster's keys inside another's (cluster 'a/workers' is a worker of 'a')
    (["--disagg-cluster-uri", "etcd://h:1", "--cluster-name", "a/b"], ["--cluster_name='a/b'"]),
    (["--disagg-cluster-uri", "etcd://h:1", "--cluster-name", ""], ["--cluster_name=''"]),
    (["--disagg-cluster-uri", "etcd://h:1", "--discovery-timeout", "-1"], ["--discovery-timeout", "-1"]),
])
def test_worker_cluster_flags_are_checked_with_clear_errors(args, words, capsys):
    from workers.cli import main
    assert main(["start", "--server-role", "CONTEXT", "--model", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("uri", ["etcd://h", "etcd://h:1/x", "etcd://:2379"])
def test_a_client_given_a_malformed_etcd_uri_is_told_what_an_etcd_uri_is(uri):
    """Not 'tcp://HOST:PORT (the broker's backend address)': a client's tcp:// is the frontend."""
    from client import ClientError
    with pytest.raises(ClientError) as e:
        Client(uri, cluster_name="x", discovery_timeout=1)
    assert repr(uri) in str(e.value) and "expected etcd://HOST:PORT" in str(e.value)
    assert "backend" not in str(e.value)


def test_broker_launch_registers_in_etcd_and_a_worker_started_elsewhere_joins(children):
    etcd = EtcdServer(children)
    config = os.path.join(children.tmp.name, "disagg.yaml")
    frontend = f"tcp://127.0.0.1:{free_port()}"
    worker = {"num_threads": 1, "device": "cpu", "heartbeat_ms": 200}
    with open(config, "w") as f:
        yaml.safe_dump({"model": "tiny", "frontend": frontend, "context_servers": {"num_instances": 1, **worker},
                        "generation_servers": {"num_instances": 0},
                        "disagg_cluster": {"cluster_uri": etcd.uri, "cluster_name": "launched",
                                           "heartbeat_interval_sec": INTERVAL, "inactive_timeout_sec": TTL,
                                           "minimal_instances": {"generation_servers": 0}}}, f)
    proc = children.start("launch", [sys.executable, "-m", "broker.cli", "launch", "-c", config, "--no-http",
                                     "--ready-timeout", "60"])
    start_worker(children, "remote-gen", "generation", etcd.uri, "--cluster-name", "launched", *LEASE_FLAGS)
    wait(children, lambda: registered(children, frontend, {"context-0", "remote-gen"}), "the joined worker")
    assert all(len(r.token_ids) == 5 for r in serve(frontend, 2))
    assert etcd.api.get_json(broker_key("launched"))["frontend"] == frontend
    proc.send_signal(signal.SIGTERM)     # stops its own workers; its lease is revoked on the way out
    assert proc.wait(30) == 0, children.tail("launch")
    assert broker_key("launched") not in etcd.keys("launched")


# ---------------------------------------------------------------------------------------------
# etcd away for 10 s, lease expiry, and clients and the gateway finding the broker through etcd

def _load(frontend: str, done: list, failures: list, stop: threading.Event, **kw) -> threading.Thread:
    """Requests one after another from a thread until ``stop``: each completion or failure kept."""
    def run():
        with Client(frontend, timeout=30, **kw) as c:
            i = 0
            while not stop.is_set():
                try:
                    done.append(c.generate(token_ids=[(i + j) % 200 + 1 for j in range(10)], max_tokens=4,
                                           ignore_eos=True))
                except Exception as e:      # noqa: BLE001 -- every failure is counted and reported
                    failures.append(e)
                i += 1
    t = threading.Thread(target=run, name="load")
    t.start()
    return t


@pytest.mark.parametrize("outage", ["stopped", "killed"])
def test_etcd_away_for_10_s_under_load_loses_no_request_and_every_key_comes_back(children, outage):
    """SIGSTOP for 10 s (its calls hang; the leases lapse meanwhile and are revoked when it wakes),
    or killed and restarted 10 s later on the same data directory and ports."""
    etcd = EtcdServer(children)
    cluster = f"away-{outage}"
    common = ["--cluster_name", cluster, *LEASE_FLAGS]
    start_broker(children, extra=["--disagg-cluster-uri", etcd.uri, *common])
    start_worker(children, "ctx", "context", etcd.uri, *common)
    start_worker(children, "gen", "generation", etcd.uri, *common)
    keys = {broker_key(cluster), worker_key(cluster, "ctx"), worker_key(cluster, "gen")}
    wait(children, lambda: etcd.keys(cluster) == keys, "every key registered")
    done, failures, stop = [], [], threading.Event()
    # the client finds the broker through etcd too
    t = _load(etcd.uri, done, failures, stop, cluster_name=cluster)
    try:
        wait(children, lambda: len(done) >= 3, "requests served")
        if outage == "stopped":
            os.kill(etcd.proc.pid, signal.SIGSTOP)
        else:
            etcd.kill()
        away = time.monotonic()
        before = len(done)
        wait(children, lambda: len(done) >= before + 5, "requests served while etcd is away")
        time.sleep(max(0.0, 10 - (time.monotonic() - away)))
        if outage == "stopped":
            os.kill(etcd.proc.pid, signal.SIGCONT)
        else:
            etcd.start()
        before = len(done)
        wait(children, lambda: len(done) >= before + 5, "requests served after etcd returns")
        # every registration is back: renewed under a live lease, past a TTL after the return
        time.sleep(TTL + 1)
        wait(children, lambda: etcd.keys(cluster) == keys, "every key registered again", timeout=TTL + 10)
    finally:
        stop.set()
        t.join(60)
    assert not failures, failures[:3]
    for key in keys:       # each under a lease etcd knows now
        assert etcd.api.get_json(key) is not None
    logs = children.tail("ctx", 200) + children.tail("gen", 200)
    if outage == "stopped":       # the leases lapsed while it slept: granted anew, keys written again
        assert "registering again" in logs, logs


def test_a_killed_workers_key_goes_within_inactive_timeout_sec_and_a_drained_ones_at_once(children):
    etcd = EtcdServer(children)
    cluster = "expiry"
    common = ["--cluster_name", cluster, *LEASE_FLAGS]
    broker = start_broker(children, extra=["--disagg-cluster-uri", etcd.uri, *common])
    start_worker(children, "ctx", "context", etcd.uri, *common)
    start_worker(children, "gen", "generation", etcd.uri, *common)
    wait(children, lambda: registered(children, broker["frontend"], {"ctx", "gen"}), "workers registered")
    wait(children, lambda: {worker_key(cluster, "ctx"), worker_key(cluster, "gen")} <= etcd.keys(cluster),
         "worker keys")
    gen = children.names["gen"]
    os.kill(gen.pid, signal.SIGKILL)
    killed = time.monotonic()
    wait(children, lambda: worker_key(cluster, "gen") not in etcd.keys(cluster), "the killed worker's key gone",
         timeout=TTL + 5)
    # its lease (TTL, last renewed before the kill) lapses within inactive_timeout_sec, give or
    # take etcd's expiry sweep (every 0.5 s) and this test's polling
    assert time.monotonic() - killed <= TTL + 1.0
    # a drained worker revokes its lease on the way out: its key is gone before it exits
    ctx = children.names["ctx"]
    ctx.send_signal(signal.SIGTERM)
    assert ctx.wait(30) == 0, children.tail("ctx")
    assert worker_key(cluster, "ctx") not in etcd.keys(cluster)
    assert "drained" in children.tail("ctx")


def test_clients_and_the_gateway_find_the_broker_through_etcd_and_follow_a_restart(children):
    import asyncio
    import json
    import urllib.request

    from broker.launch import read_line, ready_words
    from client import AsyncClient, BrokerUnavailable
    etcd = EtcdServer(children)
    cluster = "found"
    common = ["--cluster_name", cluster, *LEASE_FLAGS]
    with pytest.raises(BrokerUnavailable) as e:       # none registered yet: it says where it looked
        Client(etcd.uri, cluster_name=cluster, discovery_timeout=0.5)
    assert broker_key(cluster) in str(e.value)
    broker = start_broker(children, extra=["--disagg-cluster-uri", etcd.uri, *common])
    start_worker(children, "agg", "both", etcd.uri, *common)
    wait(children, lambda: registered(children, broker["frontend"], {"agg"}), "worker registered")
    gw = children.start("gateway", [sys.executable, "-m", "client.gateway", "--broker", etcd.uri, "--cluster-name",
                                    cluster, "--port", "0"], stdout=subprocess.PIPE)
    words = ready_words(read_line(gw, 30.0, "gateway ready line"))
    assert words["broker"] == broker["frontend"]

    def complete() -> dict:
        req = urllib.request.Request(f"{words['http']}/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": [1, 2, 3], "max_tokens": 3,
                                                      "ignore_eos": True}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    assert complete()["usage"]["completion_tokens"] == 3
    sync = Client(etcd.uri, cluster_name=cluster, timeout=30, liveness=1.0)
    try:
        assert sync.address == broker["frontend"]
        assert len(sync.generate(token_ids=[4, 5, 6], max_tokens=3, ignore_eos=True).token_ids) == 3

        async def via_async():
            async with AsyncClient(etcd.uri, cluster_name=cluster, timeout=30) as c:
                return await c.generate(token_ids=[4, 5, 6], max_tokens=3, ignore_eos=True)
        assert len(asyncio.run(via_async()).token_ids) == 3

        # the broker killed, a new one on other ports: the clients and the gateway follow its key
        os.kill(broker["pid"], signal.SIGKILL)
        children.names["broker"].wait(10)
        broker2 = start_broker(children, extra=["--disagg-cluster-uri", etcd.uri, *common])
        assert broker2["frontend"] != broker["frontend"]
        wait(children, lambda: registered(children, broker2["frontend"], {"agg"}), "worker at the new broker")
        with pytest.raises(BrokerUnavailable):     # the one in flight is lost with its broker ...
            sync.generate(token_ids=[4, 5, 6], max_tokens=3, ignore_eos=True)
        assert sync.address == broker2["frontend"]      # ... and the client moved on
        assert len(sync.generate(token_ids=[4, 5, 6], max_tokens=3, ignore_eos=True).token_ids) == 3

        def gateway_follows():
            try:
                return complete()["usage"]["completion_tokens"] == 3
            except OSError:           # 503 while its client still waits on the old broker
                return False
        wait(children, gateway_follows, "the gateway serving through the new broker", timeout=30)
    finally:
        sync.close()


def test_an_etcd_call_keeps_its_deadline_through_a_slow_name_lookup_and_a_trickling_answer(monkeypatch):
    """urllib's timeout bounds each socket operation, not a name lookup nor the whole answer:
    the call gives up at its own deadline either way."""
    import socket as socket_module

    failed = []                                # whatever a given-up call's thread met afterwards
    monkeypatch.setattr(threading, "excepthook", failed.append)
    real = socket_module.getaddrinfo

    def slow_lookup(host, *args, **kwargs):
        if host == "slow-dns.test":
            time.sleep(3)
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket_module, "getaddrinfo", slow_lookup)
    start = time.monotonic()
    with pytest.raises(EtcdError, match="no answer within 0.4 s"):
        Etcd("slow-dns.test:2379", timeout=0.4).call("kv/range", {"key": "eA=="})
    assert time.monotonic() - start < 1.5

    server = socket_module.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stop = threading.Event()

    def trickle():          # an HTTP answer one byte at a time, each within urllib's timeout
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}":
                if stop.wait(0.2):
                    return
                conn.sendall(bytes([byte]))
    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        start = time.monotonic()
        with pytest.raises(EtcdError, match="no answer within 0.6 s"):
            Etcd(f"127.0.0.1:{server.getsockname()[1]}", timeout=0.6).call("kv/range", {})
        assert time.monotonic() - start < 2.0
    finally:
        stop.set()
        t.join(5)
        server.close()
    for left in [x for x in threading.enumerate() if x.name == "etcd-call"]:
        left.join(5)                           # the given-up calls end on their own, quietly
    assert not failed, [f.exc_value for f in failed]
