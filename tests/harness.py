"""Real-process deployments for integration tests: a broker and workers, always killed by pid.

Readiness is read from the processes themselves (the broker's first stdout line, the broker's
worker registry over Ping), never guessed with sleep().
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

import yaml
import zmq

from broker.launch import ping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
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
    """A broker process and any number of worker processes; ``close()`` kills every one by pid."""

    def __init__(self, heartbeat_s: float = 0.2, liveness: int = 10, kv_lease_s: float = 30.0,
                 max_queue: int = 1024, tmpdir: Optional[str] = None, http: bool = False,
                 config: Optional[str] = None):
        self.tmp = tempfile.TemporaryDirectory(prefix="dsrv-test-")
        self.procs: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, str] = {}
        cmd = [sys.executable, "-m", "broker.cli", "start", "--frontend", "tcp://127.0.0.1:0",
               "--backend", "tcp://127.0.0.1:0", "--heartbeat-interval", str(heartbeat_s),
               "--liveness", str(liveness), "--kv-lease", str(kv_lease_s), "--max-queue", str(max_queue)]
        cmd += ["--http-port", "0"] if http else ["--no-http"]     # the OpenAI gateway, on a free port
        if config:
            cmd += ["--config", config]
        log = open(os.path.join(self.tmp.name, "broker.log"), "w")
        self.logs["broker"] = log.name
        self.broker = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=_env(), text=True)
        self.procs.append(self.broker)
        line = self._first_line(self.broker, 30)
        parts = dict(w.split("=", 1) for w in line.split() if "=" in w)
        self.frontend, self.backend = parts["frontend"], parts["backend"]
        self.http: Optional[str] = parts.get("http")     # http://127.0.0.1:PORT when http=True

    def _first_line(self, proc: subprocess.Popen, timeout: float) -> str:
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.close()
            raise TimeoutError("broker printed no ready line in time")
        line = proc.stdout.readline()
        if not line.startswith("broker ready"):
            self.close()
            raise RuntimeError(f"unexpected broker output {line!r}")
        return line

    def add_worker(self, role: str, name: str, model: str = "tiny", options: Optional[dict] = None,
                   wait: bool = True, timeout: float = 120, prefix: tuple = ()) -> subprocess.Popen:
        """Start a worker (``prefix``: a launcher in front, e.g. ``mpiexec -n 1`` for MPI)."""
        opts = {"heartbeat_ms": 200, "broker_timeout_ms": 5000, "num_threads": 1}
        opts.update(options or {})
        path = os.path.join(self.tmp.name, f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(opts, f)
        log = open(os.path.join(self.tmp.name, f"{name}.log"), "w")
        self.logs[name] = log.name
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "workers.cli", "start", "--role", role, "--broker", self.backend,
             "--model", model, "--worker-id", name, "--extra-llm-api-options", path],
            stdout=log, stderr=subprocess.STDOUT, env=_env())
        self.procs.append(proc)
        self.workers[name] = proc
        if wait:
            self.wait_for(lambda s: any(w["worker_id"] == name for w in s["workers"]), timeout,
                          f"worker {name} registered", proc)
        return proc

    def stats(self, timeout: float = 5.0) -> dict:
        s = ping(self.frontend, timeout)
        if s is None:
            raise TimeoutError("broker did not answer a ping")
        return s

    def wait_for(self, pred, timeout: float, what: str, proc: Optional[subprocess.Popen] = None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if pred(s):
                return s
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process {proc.pid} exited ({proc.returncode}) while waiting "
                                   f"for: {what}\n{self.tail(proc)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for: {what}; stats={s}")
            time.sleep(0.05)

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
        name = proc_or_name if isinstance(proc_or_name, str) else next(
            (k for k, v in self.workers.items() if v is proc_or_name), "broker")
        try:
            with open(self.logs[name]) as f:
                return "".join(f.readlines()[-n:])
        except (OSError, KeyError):
            return ""

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            if proc.stdout:
                proc.stdout.close()
        self.tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
