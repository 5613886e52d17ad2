"""examples/slurm/ on a real Slurm: each test starts a one-node cluster of its own (munged with a
generated key, slurmctld and slurmd on free ports, everything in a temporary directory; Debian's
``slurm-wlm`` and ``munge``, which install.sh installs as root), submits the example through
``submit.sh`` (sbatch) with two context workers and one generation worker of the tiny model, finding
the broker through etcd or through its own address, serves a chat completion through the job's HTTP
gateway, and checks that ``scancel`` leaves no process behind. The daemons are stopped by pid, and
anything still carrying this cluster's SLURM_CONF is killed, even when the test fails.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import yaml

from broker.discovery import Etcd, broker_key, worker_key
from broker.launch import Children
from tests.harness import ROOT, _env, free_port

pytestmark = pytest.mark.timeout(150)

SUBMIT = os.path.join(ROOT, "examples", "slurm", "submit.sh")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo")


def marked(conf: str) -> list[int]:
    """Pids of the processes whose environment carries ``SLURM_CONF=conf``: this cluster's
    daemons, step daemons, batch scripts and tasks (sbatch passes the submitter's environment on)."""
    want = f"SLURM_CONF={conf}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:            # gone meanwhile, or not ours to read
            pass
    return pids


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(gone)"


class SlurmCluster:
    """munged, slurmctld and slurmd for one node (this host, 2 CPUs, at 127.0.0.1), on free ports,
    their key, state, spool and logs in ``children.tmp``; ``env`` is for the client commands."""

    def __init__(self, children: Children):
        found = {b: shutil.which(b) or shutil.which(b, path="/usr/sbin") for b in DAEMONS + CLIENTS}
        missing = [b for b, path in found.items() if path is None]
        if missing:
            pytest.fail(f"Slurm is not installed (no {', '.join(missing)}): run install.sh as root "
                        "(it installs Debian's slurm-wlm and munge)")
        if os.geteuid() != 0:
            pytest.fail("the Slurm test runs slurmd, which starts jobs, so it needs root")
        self.children = children
        self.dir = children.tmp.name
        os.chmod(self.dir, 0o755)      # munged wants the socket's directory searchable by all
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.env = dict(children.env, SLURM_CONF=self.conf)
        children.env = self.env
        self.node = socket.gethostname().split(".")[0]
        key, sock = os.path.join(self.dir, "munge.key"), os.path.join(self.dir, "munge.sock")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        for d in ("state", "spool"):
            os.mkdir(os.path.join(self.dir, d))
        p = lambda name: os.path.join(self.dir, name)      # noqa: E731
        with open(self.conf, "w") as f:
            f.write("\n".join([
                "ClusterName=dsrvtest",
                f"SlurmctldHost={self.node}(127.0.0.1)",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                "SlurmUser=root", "SlurmdUser=root",
                "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
                f"StateSaveLocation={p('state')}", f"SlurmdSpoolDir={p('spool')}",
                f"SlurmctldPidFile={p('slurmctld.pid')}", f"SlurmdPidFile={p('slurmd.pid')}",
                f"SlurmctldLogFile={p('slurmctld.log')}", f"SlurmdLogFile={p('slurmd.log')}",
                "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
                "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
                "SchedulerType=sched/builtin", "MpiDefault=none", "ReturnToService=2", "KillWait=2",
                "MailProg=/bin/true", "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
                f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP", ""]))
        children.start("munged", [found["munged"], "--foreground", "--force", f"--key-file={key}",
                                  f"--socket={sock}", f"--pid-file={p('munged.pid')}",
                                  f"--seed-file={p('munged.seed')}", f"--log-file={p('munged.log')}"])
        self.wait(lambda: os.path.exists(sock), "munged's socket")
        children.start("slurmctld", [found["slurmctld"], "-D", "-f", self.conf])
        children.start("slurmd", [found["slurmd"], "-D", "-f", self.conf, "-N", self.node])
        self.wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
                  "the node idle in sinfo")
        self.daemons = set(marked(self.conf))     # the three and slurmctld's slurmscriptd

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=self.env, cwd=self.dir, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr}\n{self.logs()}")
        return r

    def wait(self, pred, what: str, timeout: float = 30.0, detail=lambda: ""):
        deadline = time.monotonic() + timeout
        while True:
            value = pred()
            if value:
                return value
            self.children.check_alive(what=what)
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what} {detail()}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, n: int = 15) -> str:
        """The tails of the daemons' and the jobs' logs."""
        out = []
        for root, _, files in os.walk(self.dir):
            for name in sorted(files):
                if name.endswith((".log", ".out")):
                    try:
                        with open(os.path.join(root, name), errors="replace") as f:
                            out.append(f"--- {os.path.relpath(os.path.join(root, name), self.dir)}\n"
                                       + "".join(f.readlines()[-n:]))
                    except OSError:
                        pass
        return "\n".join(out)

    def leftovers(self) -> list[int]:
        """This cluster's processes other than its daemons (and this test)."""
        return [pid for pid in marked(self.conf) if pid not in self.daemons and pid != os.getpid()]


def shutdown(children: Children, conf: str, daemons: set) -> None:
    """Cancel the jobs (while slurmctld runs), kill what is left of them (every process carrying
    SLURM_CONF but ``daemons``), stop the daemons by pid (SIGTERM, then SIGKILL), remove the
    directory; finally kill anything still carrying SLURM_CONF."""
    daemons = daemons | {p.pid for p in children.procs}
    ctld = children.names.get("slurmctld")
    if ctld is not None and ctld.poll() is None:
        try:
            subprocess.run(["scancel", "--user", "root"], env=dict(children.env, SLURM_CONF=conf),
                           capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and set(marked(conf)) - daemons - {os.getpid()}:
            time.sleep(0.2)
    try:
        for pid in set(marked(conf)) - daemons:         # step daemons, batch scripts, tasks
            kill(pid)
        for name in ("slurmd", "slurmctld", "munged"):  # in turn: munged serves the others' shutdown
            proc = children.names.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
    finally:
        children.close(grace=0)                         # whatever is left, and the directory
        for pid in marked(conf):
            kill(pid)


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def slurm():
    children = Children(prefix="dsrv-slurm-", env=_env(), cwd=ROOT)
    cluster = None
    try:
        cluster = SlurmCluster(children)
        yield cluster
    finally:
        shutdown(children, os.path.join(children.tmp.name, "slurm.conf"), cluster.daemons if cluster else set())


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{url}: HTTP {e.code}: {e.read(2000)!r}") from None


def submit(slurm: SlurmCluster, *args: str) -> subprocess.CompletedProcess:
    """``submit.sh ARGS --wait``, its logs under the cluster's directory, DSRV_READY_TIMEOUT 60 s."""
    return subprocess.run(["bash", SUBMIT, *args, "--log-dir", os.path.join(slurm.dir, "logs"), "--wait",
                           "--wait-timeout", "75", "--", "--time=5"], env=dict(slurm.env, DSRV_READY_TIMEOUT="60"),
                          cwd=slurm.dir, capture_output=True, text=True, timeout=100)


@pytest.mark.parametrize("discovery", ["etcd", "tcp"])
def test_sbatch_brings_up_broker_and_workers_that_serve_and_scancel_stops_them(slurm, discovery):
    """etcd: the job starts etcd and every process finds the broker there; tcp: the cluster URI is
    the broker's backend address (no etcd)."""
    if discovery == "etcd" and shutil.which("etcd") is None:
        pytest.fail("no `etcd` on PATH: install Debian's etcd-server (install.sh does, as root)")
    options = os.path.join(slurm.dir, "worker.yaml")
    with open(options, "w") as f:
        yaml.safe_dump({"num_threads": 1, "device": "cpu", "heartbeat_ms": 200}, f)
    http, frontend, backend, etcd, peer = (free_port() for _ in range(5))
    cluster = f"slurmtest-{os.getpid()}"
    r = submit(slurm, "--ctx", "2", "--gen", "1", "--model", "tiny", "--cluster-name", cluster,
               "--http-port", str(http), "--frontend-port", str(frontend), "--backend-port", str(backend),
               "--ctx-options", options, "--gen-options", options,
               *(["--etcd", "--etcd-port", str(etcd), "--etcd-peer-port", str(peer)]
                 if discovery == "etcd" else []))
    assert r.returncode == 0, f"submit.sh exited {r.returncode}:\n{r.stdout}{r.stderr}\n{slurm.logs()}"
    job = r.stdout.split()[1].rstrip(":")
    endpoints = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line and " " not in line)
    uri = f"etcd://127.0.0.1:{etcd}" if discovery == "etcd" else f"tcp://127.0.0.1:{backend}"
    assert endpoints == {"HTTP_URL": f"http://127.0.0.1:{http}", "FRONTEND": f"tcp://127.0.0.1:{frontend}",
                         "CLUSTER_URI": uri, "CLUSTER_NAME": cluster}, r.stdout

    # each process is a step of the job; with etcd, the broker and every worker registered there
    workers = ["context-0", "context-1", "generation-0"]
    steps = slurm.run("squeue", "-h", "-s", "-j", job, "-o", "%j").stdout.split()
    expected = ["batch", "broker", *workers] + (["etcd"] if discovery == "etcd" else [])
    assert sorted(steps) == sorted(expected), steps
    if discovery == "etcd":
        keys = set(Etcd(f"127.0.0.1:{etcd}").range(f"/trtllm-disagg/{cluster}/", prefix=True))
        assert keys == {broker_key(cluster), *(worker_key(cluster, w) for w in workers)}, keys

    out = post(f"{endpoints['HTTP_URL']}/v1/chat/completions",
               {"model": "tiny", "messages": [{"role": "user", "content": "Hello from Slurm"}],
                "max_tokens": 8, "ignore_eos": True})
    assert out["choices"][0]["message"]["content"], out
    assert out["usage"]["completion_tokens"] == 8 and out["usage"]["prompt_tokens"] > 0, out
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 8, out

    slurm.run("scancel", job)
    left: list = []

    def gone() -> bool:
        left[:] = [f"{pid} {cmdline(pid)}" for pid in slurm.leftovers()]
        state = slurm.run("squeue", "-h", "-j", job, "-t", "all", "-o", "%T", check=False).stdout.strip()
        return not left and state not in ("PENDING", "RUNNING", "COMPLETING")
    slurm.wait(gone, "every process of the job gone", timeout=30, detail=lambda: "left: " + "; ".join(left))
    for port in (http, frontend, backend, etcd, peer):     # nothing listens there any more
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # connections may be in TIME_WAIT
            s.bind(("127.0.0.1", port))
            s.listen()


def test_a_job_that_cannot_place_its_workers_fails_and_says_why(slurm):
    r = submit(slurm, "--ctx", "3", "--gen", "1", "--workers-per-node", "1", "--model", "tiny")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ended (" in r.stderr and "4 workers do not fit on 1 node(s) at 1 per node" in r.stderr, r.stderr
    assert not slurm.leftovers()
