"""``broker launch``: a broker plus the workers a ``disagg_config.yaml`` asks for, on this host.

The broker runs in this process; each worker is a child process started with
``--exit-with-parent``. On Ctrl-C or SIGTERM every child is stopped (SIGTERM, then SIGKILL after a
grace period), so no orphan is left behind.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Optional

import yaml
import zmq

from broker import protocol as p
from broker.config import DisaggConfig, ServerGroup
from broker.server import BrokerServer

log = logging.getLogger("broker.launch")

def ping(address: str, timeout: float = 2.0, ctx: Optional[zmq.Context] = None) -> Optional[dict]:
    """One Ping to a broker frontend; its stats, or None if it did not answer in time."""
    ctx = ctx or zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(address)
        nonce = int.from_bytes(os.urandom(4), "little")
        s.send_multipart(p.Ping(nonce).encode())
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not s.poll(int(left * 1000) + 1):
                break
            try:
                msgs = p.decode_all(s.recv_multipart())
            except p.ProtocolError:
                continue
            for msg in msgs:
                if isinstance(msg, p.Pong) and msg.nonce == nonce:
                    return msg.stats
        return None
    finally:
        s.close(0)


def start_gateway(cfg: DisaggConfig, frontend: str, port: Optional[int] = None, models: tuple = ()):
    """The OpenAI-compatible HTTP gateway on the config's hostname:port (``port`` overrides it),
    in a thread of this process, talking to the broker at ``frontend``. Returns the running
    ``GatewayThread``; raises OSError when the port cannot be bound."""
    from client.gateway import Gateway, GatewayThread     # aiohttp is needed only when serving HTTP
    gw = Gateway(frontend, host=cfg.hostname, port=cfg.port if port is None else port, models=models,
                 min_workers=cfg.min_workers, request_timeout=cfg.broker.request_timeout_s)
    thread = GatewayThread(gw)
    thread.start()
    return thread


def _transfer_backend(options_path: Optional[str]) -> str:
    """The cache_transceiver_config.backend a worker options file asks for (upper case), or ''."""
    if not options_path:
        return ""
    with open(options_path) as f:
        raw = yaml.safe_load(f) or {}
    ctc = raw.get("cache_transceiver_config") or {} if isinstance(raw, dict) else {}
    return str(ctc.get("backend", "")).upper() if isinstance(ctc, dict) else ""


class Launch:
    def __init__(self, cfg: DisaggConfig, log_level: str = "INFO", http: bool = True,
                 http_port: Optional[int] = None):
        self.cfg = cfg
        self.log_level = log_level
        self.server = BrokerServer(cfg.frontend, cfg.backend_address, cfg.broker)
        self.thread = threading.Thread(target=self.server.run, name="broker", daemon=True)
        self.http, self.http_port = http, http_port
        self.gateway = None
        self.children: list[subprocess.Popen] = []
        self.groups: dict[int, str] = {}     # worker pid -> which group of the config started it
        self.tmpdir = tempfile.TemporaryDirectory(prefix="disagg-launch-")

    @property
    def frontend(self) -> str:
        return self.server.frontend

    def _options_file(self, name: str, group: ServerGroup) -> Optional[str]:
        inline = dict(group.options)
        base = {}
        if group.extra_llm_api_options:
            path = group.extra_llm_api_options
            if not os.path.isabs(path) and self.cfg.source not in ("<dict>", "<defaults>"):
                path = os.path.join(os.path.dirname(os.path.abspath(self.cfg.source)), path)
            if not inline:
                return path
            with open(path) as f:
                base = yaml.safe_load(f) or {}
        if not inline:
            return None
        base.update(inline)
        out = os.path.join(self.tmpdir.name, f"{name}.yaml")
        with open(out, "w") as f:
            yaml.safe_dump(base, f)
        return out

    @property
    def http_url(self) -> Optional[str]:
        return self.gateway.gateway.url if self.gateway is not None else None

    def start(self) -> None:
        self.thread.start()
        if self.http:
            self.gateway = start_gateway(self.cfg, self.frontend, self.http_port, (self.cfg.model,))
        for name, role, group in (("context_servers", "context", self.cfg.context_servers),
                                  ("generation_servers", "generation", self.cfg.generation_servers)):
            opts = self._options_file(name, group)
            # MPI workers join through Open_port/Connect only when each runs under its own
            # `mpiexec -n 1` (the one the mpich wheel installs beside python)
            prefix = ([os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-n", "1"]
                      if _transfer_backend(opts) == "MPI" else [])
            for i in range(group.num_instances):
                cmd = [*prefix, sys.executable, "-m", "workers.cli", "start", "--role", role,
                       "--broker", self.server.backend, "--model", self.cfg.model,
                       "--worker-id", f"{role}-{i}", "--exit-with-parent",
                       "--log-level", self.log_level, *group.args]
                if opts:
                    cmd += ["--extra-llm-api-options", opts]
                self.children.append(subprocess.Popen(cmd))
                self.groups[self.children[-1].pid] = f"{name}[{i}] of {self.cfg.source}"
                log.info("started %s worker %d (pid %d)", role, i, self.children[-1].pid)

    def wait_ready(self, timeout: float, progress=print) -> None:
        want = {"context": self.cfg.context_servers.num_instances,
                "generation": self.cfg.generation_servers.num_instances}
        deadline = time.monotonic() + timeout
        last = None
        while True:
            for c in self.children:
                if c.poll() is not None:
                    raise RuntimeError(f"worker pid {c.pid} ({self.groups.get(c.pid, 'worker')}) exited "
                                       f"with code {c.returncode} before it was ready (see its log above)")
            stats = ping(self.frontend, timeout=1.0) or {"workers": []}
            have = {r: sum(1 for w in stats["workers"] if w["role"] == r) for r in want}
            line = ", ".join(f"{r} {have[r]}/{want[r]}" for r in want)
            if line != last:
                progress(f"waiting for workers: {line}")
                last = line
            if all(have[r] >= want[r] for r in want):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready after {timeout:.0f} s ({line})")
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        for c in self.children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in self.children:
            try:
                c.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in %.0f s; killing it", c.pid, grace)
                c.kill()
                c.wait(5)
        if self.gateway is not None:
            self.gateway.stop()
        self.server.stop()
        self.thread.join(5)
        self.server.close()
        self.tmpdir.cleanup()


DEMO_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write one sentence about the ocean."}],
]


def run_demo(frontend: str, prompts: list, max_tokens: int = 48, out=print) -> int:
    from client import Client, ClientError
    failures = 0
    with Client(frontend, timeout=300) as c:
        for messages in prompts:
            question = messages[-1]["content"]
            try:
                r = c.chat(messages, max_tokens=max_tokens, request_id=f"demo-{uuid.uuid4().hex[:8]}")
            except ClientError as e:
                out(f"Q: {question}\n   error: {e}")
                failures += 1
                continue
            t = r.timings
            out(f"Q: {question}\nA: {r.text.strip()}\n   [{r.usage.get('prompt_tokens')} prompt + "
                f"{r.usage.get('completion_tokens')} output tokens, finish={r.finish_reason}] "
                f"queue {t.get('queue', 0) * 1000:.0f} ms, prefill {t.get('prefill', 0) * 1000:.0f} ms, "
                f"kv transfer {t.get('kv_transfer', 0) * 1000:.1f} ms, ttft {(t.get('ttft') or 0) * 1000:.0f} ms, "
                f"total {t.get('total', 0) * 1000:.0f} ms")
    return 1 if failures else 0
