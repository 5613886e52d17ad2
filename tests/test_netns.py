"""Past one machine: the broker, a context worker and a generation worker each on a "host" of its
own, three network namespaces on one bridge, and disaggregated output equal to aggregated output
token for token over the ZMQ, NIXL, UCX and MPI transfer backends and DEFAULT (NIXL); SHM
refuses, naming both hosts.

Each namespace gets an address in a private /24 and its loopback; nothing is routed to or from
the machine's own network. Every process there also runs with a hostname and a kernel boot id of
its own (a UTS namespace, and a file bind-mounted over /proc/sys/kernel/random/boot_id in the
mount namespace `ip netns exec` gives it), so UCX and the SHM backend see three hosts, as they
would on three machines, instead of one machine's shared memory (UCX then moves the KV over TCP
on the veth links).

The broker binds its sockets to 0.0.0.0 and advertises the config's ``hostname``; workers find it
through etcd (in the broker's namespace) and start with no address set, so their KV endpoints
bind to, and advertise, their namespace's address on the route toward it (broker/addresses.py);
the ZMQ context worker binds 0.0.0.0 with ``--advertise-host``. The aggregated reference is a
``both`` worker on this machine's loopback (tests/harness.py).

Needs root (it creates namespaces, links and mounts): without root or ``ip netns``, it fails with
the reason rather than skip. Every process is killed by pid and every namespace and link deleted
by name, whatever happened.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from broker.launch import Children, ready_words
from client import Client
from tests.harness import ROOT, Deployment, _env
from transfer.loopback import launcher

pytestmark = pytest.mark.timeout(600)

TAG = f"ds{os.getpid()}"                     # in every namespace and link name: unique per run
NET = "10.231.7"                             # a private /24; it exists only inside the namespaces
HOSTS = {"broker": 1, "ctx": 2, "gen": 3}    # namespace -> last octet
# etcd cannot pick a free port of its own; nothing else listens in a namespace this test just
# made, so its ports are free there (the broker picks its own: port 0)
ETCD_PORT, ETCD_PEER_PORT = 2379, 2380
PROMPTS = [{"token_ids": [7]}, {"token_ids": list(range(3, 40))},
           {"token_ids": [(i * 37) % 256 for i in range(150)]}, {"prompt": "Hello, world"}]
SAMPLING = dict(max_tokens=8, ignore_eos=True)

# the client side, run in the broker's namespace: finds the broker's frontend in etcd, waits for
# exactly the given workers, runs the prompts (or reports the error of the first that fails) and
# reports etcd's keys; one JSON line out
DRIVER = r"""
import json, sys, time
from broker.discovery import KEY_ROOT, Etcd, broker_key
from broker.launch import wait_until
from client import Client, ClientError
etcd, cluster, names, prompts, sampling = sys.argv[1:6]
names, prompts, sampling = set(json.loads(names)), json.loads(prompts), json.loads(sampling)
deadline = time.monotonic() + 60
while (broker := Etcd(etcd).get_json(broker_key(cluster))) is None:
    assert time.monotonic() < deadline, "no broker key in etcd after 60 s"
    time.sleep(0.1)
frontend = broker["frontend"]
wait_until(frontend, lambda s: {w["worker_id"] for w in s["workers"]} == names, 120,
           f"exactly the workers {sorted(names)} registered")
out = {"tokens": [], "error": None}
with Client(frontend, timeout=60) as c:
    try:
        for kw in prompts:
            out["tokens"].append([t for ch in c.stream(**kw, **sampling) for t in ch.token_ids])
    except ClientError as e:
        out["error"] = f"{type(e).__name__}: {e}"
keys = Etcd(etcd).range(f"{KEY_ROOT}/{cluster}/", prefix=True)
out["etcd"] = {k.rsplit("/", 1)[-1]: json.loads(v) for k, v in keys.items()}
print(json.dumps(out), flush=True)
"""

# the "other host" wrapper: a hostname and a boot id of its own, then the command ($3...)
AS_HOST = ('hostname "$1" && mount --bind "$2" /proc/sys/kernel/random/boot_id && shift 2 '
           '&& exec "$@"')


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _require_root_and_netns() -> None:
    """Fail (never skip) with what is missing: CI runs this suite as root."""
    if os.geteuid() != 0:
        pytest.fail("tests/test_netns.py needs root: it creates network namespaces, veth links and a "
                    "bridge (`ip netns`, `ip link`) and bind-mounts a boot id; run the suite as root")
    for tool in ("ip", "unshare", "mount", "hostname"):
        if shutil.which(tool) is None:
            pytest.fail(f"tests/test_netns.py needs `{tool}` on PATH (iproute2, util-linux)")
    if shutil.which("etcd") is None:
        pytest.fail("tests/test_netns.py needs `etcd` on PATH (apt-get install etcd-server; install.sh "
                    "installs it as root)")
    res = _ip("netns", "list", check=False)
    if res.returncode != 0:
        pytest.fail(f"`ip netns` is unavailable here: {res.stderr.strip()}")


class Hosts:
    """Three namespaces ``TAG-broker``, ``TAG-ctx``, ``TAG-gen`` on a bridge in the broker's,
    and the processes started in them (``children``)."""

    def __init__(self) -> None:
        self.ns = {name: f"{TAG}-{name}" for name in HOSTS}
        self.addr = {name: f"{NET}.{i}" for name, i in HOSTS.items()}
        self.bridge = f"{TAG}br"
        self.links = {name: (f"{TAG}{name[0]}", f"{TAG}{name[0]}p") for name in HOSTS if name != "broker"}
        env = _env()
        env.pop("UCX_NET_DEVICES", None)     # other test modules set lo for their children
        self.children = Children(prefix="dsrv-netns-", env=env, cwd=ROOT)
        self.ready: dict = {}                # the broker's ready line, word by word
        self.boot_ids = {}
        for name in HOSTS:
            path = os.path.join(self.children.tmp.name, f"boot_id-{name}")
            with open(path, "w") as f:
                f.write(f"{uuid.uuid4()}\n")
            self.boot_ids[name] = path

    def create(self) -> None:
        for ns in self.ns.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        b = self.ns["broker"]
        _ip("-n", b, "link", "add", self.bridge, "type", "bridge")
        _ip("-n", b, "addr", "add", f"{self.addr['broker']}/24", "dev", self.bridge)
        _ip("-n", b, "link", "set", self.bridge, "up")
        for name, (near, far) in self.links.items():
            _ip("link", "add", near, "netns", b, "type", "veth", "peer", "name", far, "netns", self.ns[name])
            _ip("-n", b, "link", "set", near, "master", self.bridge, "up")
            _ip("-n", self.ns[name], "addr", "add", f"{self.addr[name]}/24", "dev", far)
            _ip("-n", self.ns[name], "link", "set", far, "up")

    def command(self, name: str, cmd: list) -> list:
        """``cmd`` run on host ``name``: in its namespace, with its hostname and boot id."""
        return ["ip", "netns", "exec", self.ns[name], "unshare", "--uts", "--", "sh", "-c", AS_HOST,
                "sh", f"{TAG}-{name}", self.boot_ids[name], *cmd]

    def start(self, name: str, label: str, cmd: list) -> subprocess.Popen:
        return self.children.start(label, self.command(name, cmd))

    def run(self, name: str, cmd: list, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(name, cmd), capture_output=True, text=True, timeout=timeout,
                              env=self.children.env, cwd=ROOT)

    def kill_in(self, *names: str) -> None:
        """Every process left in these hosts' namespaces (only ours can be there), by pid."""
        for name in names:
            for pid in _ip("netns", "pids", self.ns[name], check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass

    def kill_all(self) -> None:
        """Every process we started, then anything else left in our namespaces, by pid."""
        self.children.close(grace=0)
        self.kill_in(*self.ns)

    def delete(self) -> None:
        """Namespaces and links by name (a link in a deleted namespace goes with it; one left in
        this namespace by a half-done setup is deleted here)."""
        for ns in self.ns.values():
            _ip("netns", "del", ns, check=False)
        present = _ip("-o", "link", "show", check=False).stdout
        for near, far in self.links.values():
            for link in (near, far):
                if f" {link}@" in present or f" {link}:" in present:
                    _ip("link", "del", link, check=False)


@pytest.fixture(scope="module")
def hosts():
    _require_root_and_netns()
    h = Hosts()
    try:
        h.create()
        _start_etcd_and_broker(h)
        yield h
    finally:
        try:
            h.kill_all()
        finally:
            h.delete()
    leftover = [ns for ns in h.ns.values() if ns in _ip("netns", "list", check=False).stdout]
    assert leftover == [], f"namespaces left behind: {leftover}"


def _start_etcd_and_broker(h: Hosts) -> None:
    b = h.addr["broker"]
    etcd = h.start("broker", "etcd", [
        shutil.which("etcd"), "--name", TAG, "--data-dir", os.path.join(h.children.tmp.name, "etcd"),
        "--listen-client-urls", f"http://{b}:{ETCD_PORT}", "--advertise-client-urls", f"http://{b}:{ETCD_PORT}",
        "--listen-peer-urls", f"http://127.0.0.1:{ETCD_PEER_PORT}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{ETCD_PEER_PORT}",
        "--initial-cluster", f"{TAG}=http://127.0.0.1:{ETCD_PEER_PORT}"])
    config = os.path.join(h.children.tmp.name, "disagg.yaml")
    with open(config, "w") as f:       # wildcard binds, advertised at hostname (broker/addresses.py)
        yaml.safe_dump({"hostname": b, "port": 0, "frontend": "tcp://0.0.0.0:0",
                        "backend_address": "tcp://0.0.0.0:0",
                        "broker": {"heartbeat_interval_s": 0.2, "liveness": 10},
                        "disagg_cluster": {"cluster_uri": f"etcd://{b}:{ETCD_PORT}", "cluster_name": TAG,
                                           "heartbeat_interval_sec": 1, "inactive_timeout_sec": 3}}, f)
    broker = h.start("broker", "broker", [sys.executable, "-m", "broker.cli", "start", "-c", config])
    deadline = time.monotonic() + 60
    while not (ready := [line for line in h.children.tail("broker", 200).splitlines()
                         if line.startswith("broker ready")]):
        h.children.check_alive([etcd, broker], "the broker's ready line")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no ready line from the broker in 60 s:\n{h.children.tail('broker')}")
        time.sleep(0.1)
    h.ready = ready_words(ready[0])


@pytest.fixture(scope="module")
def aggregated():
    with Deployment() as dep:
        dep.add_worker("both", "both0")
        with Client(dep.frontend, timeout=60) as c:
            return [[t for ch in c.stream(**kw, **SAMPLING) for t in ch.token_ids] for kw in PROMPTS]


def _serve(h: Hosts, backend: str, ctx_flags: tuple = ()) -> tuple[dict, dict]:
    """A context and a generation worker of ``backend`` on their own hosts; the driver's report
    and the workers' first stdout lines. The workers are killed before it returns."""
    opts = os.path.join(h.children.tmp.name, f"{backend}.yaml")
    with open(opts, "w") as f:
        yaml.safe_dump({"heartbeat_ms": 200, "broker_timeout_ms": 5000, "num_threads": 1, "device": "cpu",
                        "cache_transceiver_config": {"backend": backend, "max_tokens_in_buffer": 64}}, f)
    uri = f"etcd://{h.addr['broker']}:{ETCD_PORT}"
    names = {"ctx": f"ctx-{backend}", "gen": f"gen-{backend}"}
    procs = {}
    try:
        for host, role, flags in (("ctx", "context", ctx_flags), ("gen", "generation", ())):
            procs[host] = h.start(host, names[host], [
                *launcher(backend), sys.executable, "-m", "workers.cli", "start", "--role", role, "--model", "tiny",
                "--worker-id", names[host], "--disagg-cluster-uri", uri, "--cluster-name", TAG,
                "--heartbeat-interval-sec", "1", "--inactive-timeout-sec", "3",
                "--extra-llm-api-options", opts, *flags])
        try:
            res = h.run("broker", [sys.executable, "-c", DRIVER, f"{h.addr['broker']}:{ETCD_PORT}", TAG,
                                   json.dumps(list(names.values())), json.dumps(PROMPTS), json.dumps(SAMPLING)],
                        timeout=240)
        except subprocess.TimeoutExpired as e:
            res = subprocess.CompletedProcess(e.cmd, -9, e.stdout or "", f"timed out: {e.stderr or ''}")
        logs = "".join(f"\n--- {n}\n{h.children.tail(n, 30)}" for n in names.values())
        assert res.returncode == 0, f"driver failed: {res.stderr[-3000:]}{logs}"
        report = json.loads(res.stdout.strip().splitlines()[-1])
        firsts = {host: next((line for line in h.children.tail(names[host], 400).splitlines()
                              if line.startswith("worker ")), "") for host in names}
        report["logs"] = logs
        return report, firsts
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        h.kill_in("ctx", "gen")         # a worker under a launcher (MPI's mpiexec) is its child


@pytest.mark.parametrize("backend,ctx_flags", [
    pytest.param("ZMQ", ("--host", "0.0.0.0", "--advertise-host", f"{NET}.{HOSTS['ctx']}"), id="ZMQ"),
    pytest.param("NIXL", (), id="NIXL"),
    pytest.param("UCX", (), id="UCX"),
    pytest.param("MPI", (), id="MPI"),          # MPICH over UCX, each worker under its own mpiexec.gforker
    pytest.param("DEFAULT", (), id="DEFAULT"),  # NIXL where installed (install.sh does), else ZMQ
])
def test_disaggregated_across_hosts_equals_aggregated(hosts, aggregated, backend, ctx_flags):
    report, firsts = _serve(hosts, backend, ctx_flags)
    assert report["error"] is None, f"{report['error']}{report['logs']}"
    assert report["tokens"] == aggregated, report["logs"]
    b, ctx = hosts.addr["broker"], hosts.addr["ctx"]
    # bound to 0.0.0.0, published at the config's hostname, on the ports it bound
    bound = {k: hosts.ready[k].rsplit(":", 1) for k in ("frontend", "backend", "http")}
    assert bound["frontend"][0] == bound["backend"][0] == "tcp://0.0.0.0", hosts.ready
    published = report["etcd"]["broker"]
    assert (published["frontend"], published["backend"], published["http"]) == (
        f"tcp://{b}:{bound['frontend'][1]}", f"tcp://{b}:{bound['backend'][1]}",
        f"http://{b}:{bound['http'][1]}"), published
    transfer = report["etcd"][f"ctx-{backend}"]["transfer"]
    assert transfer["backend"] == ("NIXL" if backend == "DEFAULT" else backend), transfer
    endpoint = transfer["endpoint"]
    assert endpoint.startswith(f"tcp://{ctx}:"), (endpoint, firsts["ctx"])
    assert report["etcd"][f"ctx-{backend}"]["host"] == f"{TAG}-ctx"       # its own "host"


def test_shm_refuses_a_context_worker_on_another_host(hosts):
    report, _ = _serve(hosts, "SHM")
    assert report["error"] is not None, f"SHM served across hosts: {report['tokens']}"
    assert "only between workers on one host" in report["error"], report["error"] + report["logs"]
