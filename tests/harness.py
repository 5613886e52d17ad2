"""Real-process deployments for integration tests: a broker and workers, always killed by pid.

Processes are started, awaited and stopped through the launcher (``broker/launch.py``), the same
one ``broker launch`` and the benchmarks use. Readiness is read from the processes themselves
(the broker's first stdout line, the broker's worker registry over Ping), never guessed with sleep().
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from typing import Optional

import yaml
import zmq

from broker.launch import Children, child_env, ping, start_broker, wait_until, worker_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers that cannot pick their own, e.g. Prometheus)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = child_env(ROOT)
    env["OMP_NUM_THREADS"] = "1"      # the test machine's cores are shared: one thread per process
    return env


@contextlib.contextmanager
def raw_client(address: str):
    """A bare DEALER on a broker frontend, for tests that speak the protocol byte by byte."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    try:
        yield s
    finally:
        s.close(0)
        ctx.term()


class Deployment:
    """A broker process and any number of worker processes; ``close()`` kills every one by pid
    (tests may append processes of their own to ``procs``; they are killed too)."""
    broker_args: tuple = ()    # more `broker start` flags (a subclass may set them before __init__)
    curve = None               # the broker.auth.CurveClient its pings use, for a broker with CURVE

    def __init__(self, heartbeat_s: float = 0.2, liveness: int = 10, kv_lease_s: float = 30.0,
                 max_queue: int = 1024, http: bool = False,
                 config: Optional[str] = None, max_migrations: Optional[int] = None):
        self.children = Children(prefix="dsrv-test-", env=_env())
        self.tmp = self.children.tmp
        self.procs: list[subprocess.Popen] = self.children.procs
        self.workers: dict[str, subprocess.Popen] = {}
        flags = ["--heartbeat-interval", str(heartbeat_s), "--liveness", str(liveness),
                 "--kv-lease", str(kv_lease_s), "--max-queue", str(max_queue)]
        if max_migrations is not None:
            flags += ["--max-migrations", str(max_migrations)]
        try:
            words = start_broker(self.children, http=http,
                                 extra=[*flags, *self.broker_args, *(["--config", config] if config else [])])
        except BaseException:
            self.close()
            raise
        self.broker = self.children.names["broker"]
        self.frontend, self.backend = words["frontend"], words["backend"]
        self.http: Optional[str] = words.get("http")     # http://127.0.0.1:PORT when http=True

    def add_worker(self, role: str, name: str, model: str = "tiny", options: Optional[dict] = None,
                   wait: bool = True, timeout: float = 120, prefix: tuple = (),
                   extra: tuple = ()) -> subprocess.Popen:
        """Start a worker (``prefix``: a launcher in front, e.g. ``mpiexec -n 1`` for MPI)."""
        # the CPU unless a test asks for a GPU: the suite runs the same on machines with one
        opts = {"heartbeat_ms": 200, "broker_timeout_ms": 5000, "num_threads": 1, "device": "cpu"}
        opts.update(options or {})
        path = os.path.join(self.tmp.name, f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(opts, f)
        proc = self.children.start(name, worker_command(role, self.backend, model, worker_id=name,
                                                        options=path, prefix=prefix, extra=extra))
        self.workers[name] = proc
        if wait:
            self.wait_for(lambda s: any(w["worker_id"] == name for w in s["workers"]), timeout,
                          f"worker {name} registered", proc)
        return proc

    def stats(self, timeout: float = 5.0) -> dict:
        s = ping(self.frontend, timeout, curve=self.curve)
        if s is None:
            raise TimeoutError("broker did not answer a ping")
        return s

    def wait_for(self, pred, timeout: float, what: str, proc: Optional[subprocess.Popen] = None) -> dict:
        """Until ``pred(stats)``; fails at once, with its log tail, if ``proc`` exits meanwhile."""
        check = (lambda: self.children.check_alive([proc], what)) if proc is not None else None
        return wait_until(self.frontend, pred, timeout, what, check, ping_timeout=5.0, curve=self.curve)

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Until the broker holds no request and every worker reports no used block and no lease."""
        def idle(s):
            return s["requests"] == 0 and all(
                w["inflight"] == 0 and w["leases"] == 0 and w["leases_reported"] == 0
                and w["free_blocks"] == w["kv_blocks"] for w in s["workers"])
        return self.wait_for(idle, timeout, "broker and workers idle (no requests, blocks, leases)")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal to a worker by pid; for a fatal one, wait until it is gone."""
        proc = self.workers[name]
        os.kill(proc.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            proc.wait(10)

    def tail(self, proc_or_name, n: int = 40) -> str:
        return self.children.tail(proc_or_name, n)

    def close(self) -> None:
        self.children.close(grace=0)      # SIGKILL: tests never wait for a graceful shutdown

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
