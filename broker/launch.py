"""The one launcher: a broker and workers as processes, readiness read from the broker, and a stop
that leaves no process behind.

``broker launch``, the integration tests (``tests/harness.py``) and the benchmarks all start
processes through ``Children`` and the command builders here, and wait through ``wait_until``:

* ``Children`` holds child processes by pid, each with its log file (or the parent's terminal);
  ``close()`` sends SIGTERM, waits a grace period, then SIGKILLs what is left.
* ``start_broker`` runs ``broker start`` on free ports and returns the addresses of its ready line;
  ``worker_command`` is the one place a ``worker start`` command line is written.
* ``wait_until``/``wait_for_workers`` poll the broker's stats over Ping; readiness is never a
  guess with ``sleep()``, and a child that dies while we wait fails the wait with its log tail.
* ``Launch`` is ``broker launch``: the broker (and HTTP gateway) in this process, the workers a
  ``disagg_config.yaml`` asks for as children started with ``--exit-with-parent``.

This module never imports torch: the workers load models in their own processes.
"""
from __future__ import annotations

import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Optional, Sequence

import yaml
import zmq

from broker import protocol as p
from broker.addresses import broker_published
from broker.auth import CONFIG_NAMES, CurveClient, api_key_from, broker_curve, public_file, self_client
from broker.config import ConfigError, DisaggConfig, read_yaml, worker_options
from broker.discovery import register_broker

log = logging.getLogger("broker.launch")


def ping(address: str, timeout: float = 2.0, ctx: Optional[zmq.Context] = None,
         curve: Optional[CurveClient] = None) -> Optional[dict]:
    """One Ping to a broker frontend; its stats, or None if it did not answer in time."""
    ctx = ctx or zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE_BYTES)
    if curve is not None:
        curve.apply(s)
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


# ---------------------------------------------------------------------------------------------
# child processes

def child_env(root: str) -> dict:
    """This environment with ``root`` first on PYTHONPATH (children import the same tree as the
    parent) and one OpenMP thread unless the caller chose otherwise."""
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class Children:
    """Child processes by name, each logging to a file in a temporary folder (or, with
    ``inherit=True``, to this process's terminal). ``procs`` is a plain list: a caller may append
    processes it started itself, and ``close()`` stops those too."""

    def __init__(self, prefix: str = "disagg-", env: Optional[dict] = None, cwd: Optional[str] = None):
        self.tmp = tempfile.TemporaryDirectory(prefix=prefix)
        self.env, self.cwd = env, cwd
        self.procs: list[subprocess.Popen] = []
        self.names: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, str] = {}

    def start(self, name: str, cmd: Sequence[str], stdout=None, stdin=None,
              inherit: bool = False) -> subprocess.Popen:
        """Start ``cmd``. Its output goes to ``NAME.log`` (stderr only when ``stdout`` is given,
        e.g. a pipe for its ready line), or to this terminal with ``inherit``."""
        out = err = log_file = None
        if not inherit:
            path = os.path.join(self.tmp.name, re.sub(r"[^\w.-]", "_", name) + ".log")
            log_file = open(path, "w")
            self.logs[name] = path
            out, err = (stdout, log_file) if stdout is not None else (log_file, subprocess.STDOUT)
        try:
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, stdin=stdin, env=self.env,
                                    cwd=self.cwd, text=True)
        finally:
            if log_file is not None:
                log_file.close()      # the child holds its own copy
        self.procs.append(proc)
        self.names[name] = proc
        return proc

    def name_of(self, proc: subprocess.Popen) -> str:
        return next((n for n, q in self.names.items() if q is proc), f"pid {proc.pid}")

    def forget(self, proc: subprocess.Popen) -> str:
        """Stop watching ``proc`` (it has exited on purpose); its name, for the message."""
        name = self.name_of(proc)
        self.procs.remove(proc)
        self.names.pop(name, None)
        return name

    def tail(self, name_or_proc, n: int = 40) -> str:
        """The last ``n`` lines of a child's log ('' when it has none)."""
        name = name_or_proc if isinstance(name_or_proc, str) else self.name_of(name_or_proc)
        try:
            with open(self.logs[name]) as f:
                return "".join(f.readlines()[-n:])
        except (OSError, KeyError):
            return ""

    def exited(self, procs: Optional[Sequence[subprocess.Popen]] = None) -> Optional[subprocess.Popen]:
        """The first of ``procs`` (default: all) that has exited, or None."""
        return next((q for q in (self.procs if procs is None else procs) if q.poll() is not None), None)

    def check_alive(self, procs: Optional[Sequence[subprocess.Popen]] = None, what: str = "") -> None:
        """Raise RuntimeError, naming the process, its exit code and its log tail, if one exited."""
        proc = self.exited(procs)
        if proc is None:
            return
        tail = self.tail(proc)
        raise RuntimeError(f"{self.name_of(proc)} (pid {proc.pid}) exited with code {proc.returncode}"
                           + (f" while waiting for: {what}" if what else "")
                           + (f"\n{tail}" if tail else " (see its output above)"))

    def close(self, grace: float = 5.0) -> None:
        """Stop every child (SIGTERM, SIGKILL after ``grace`` s; at once when ``grace`` <= 0)."""
        _stop_processes(self.procs, grace)
        self.procs.clear()
        self.names.clear()
        self.tmp.cleanup()

    def __enter__(self) -> "Children":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


def _stop_processes(procs: Sequence[subprocess.Popen], grace: float) -> None:
    """SIGTERM each live process, wait until ``grace`` s have passed, SIGKILL the rest (with
    ``grace`` <= 0, SIGKILL at once); reap them all and close their pipes."""
    for proc in procs:
        if proc.poll() is None:
            _signal(proc, signal.SIGTERM if grace > 0 else signal.SIGKILL)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop in %.0f s; killing it", proc.pid, grace)
            _signal(proc, signal.SIGKILL)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                log.error("pid %d survived SIGKILL for 10 s", proc.pid)
        for f in (proc.stdout, proc.stdin):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


def read_line(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """The next stdout line of a child started with ``stdout=PIPE``, within ``timeout`` seconds."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise TimeoutError(f"no {what} from pid {proc.pid} within {timeout:g} s")
    finally:
        sel.close()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"pid {proc.pid} exited (code {proc.wait(5)}) before its {what}")
    return line.strip()


# ---------------------------------------------------------------------------------------------
# the broker and workers as children

def ready_words(line: str) -> dict:
    """The ``key=value`` words of a ready line (``broker ready frontend=... backend=...``)."""
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


def start_broker(children: Children, http: bool = False, log_level: Optional[str] = None,
                 extra: Sequence[str] = ()) -> dict:
    """``broker start`` on free ports, with its HTTP gateway on a free port or none; returns the
    ``key=value`` words of its ready line (frontend, backend, http) and its ``pid``."""
    cmd = [sys.executable, "-m", "broker.cli", "start", "--frontend", "tcp://127.0.0.1:0",
           "--backend", "tcp://127.0.0.1:0", *(["--http-port", "0"] if http else ["--no-http"]),
           *(["--log-level", log_level] if log_level else []), *extra]
    proc = children.start("broker", cmd, stdout=subprocess.PIPE)
    try:
        line = read_line(proc, 30.0, "ready line")
    except (TimeoutError, RuntimeError) as e:
        raise RuntimeError(f"{e}\n{children.tail('broker')}") from None
    if not line.startswith("broker ready"):
        raise RuntimeError(f"unexpected first line from the broker: {line!r}\n{children.tail('broker')}")
    words = ready_words(line)
    words["pid"] = proc.pid
    return words


def worker_command(role: str, broker: str, model: str, worker_id: Optional[str] = None,
                   options: Optional[str] = None, log_level: Optional[str] = None,
                   exit_with_parent: bool = False, prefix: Sequence[str] = (),
                   extra: Sequence[str] = ()) -> list:
    """The ``worker start`` command line (``prefix``: a launcher in front, e.g. ``mpiexec.gforker -n 1``)."""
    cmd = [*prefix, sys.executable, "-m", "workers.cli", "start", "--role", role, "--broker", broker,
           "--model", model]
    if worker_id:
        cmd += ["--worker-id", worker_id]
    if exit_with_parent:
        cmd.append("--exit-with-parent")
    if log_level:
        cmd += ["--log-level", log_level]
    cmd += list(extra)
    if options:
        cmd += ["--extra-llm-api-options", options]
    return cmd


def wait_until(frontend: str, pred: Callable[[dict], bool], timeout: float, what: str,
               check: Optional[Callable[[], None]] = None, ping_timeout: float = 2.0,
               interval: float = 0.05, curve: Optional[CurveClient] = None) -> dict:
    """Poll the broker's stats until ``pred(stats)`` holds and return them. ``check()`` raises
    when a process we wait on has died; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    stats = None
    while True:
        stats = ping(frontend, ping_timeout, curve=curve)
        if stats is not None and pred(stats):
            return stats
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for: {what}; stats={stats}")
        time.sleep(interval)      # between polls only: readiness itself is read from the broker


def wait_for_workers(frontend: str, want: dict, timeout: float, children: Optional[Children] = None,
                     progress: Optional[Callable[[str], None]] = None,
                     curve: Optional[CurveClient] = None) -> dict:
    """Until the broker reports at least ``want[role]`` registered workers of each role;
    ``progress`` gets a line each time the counts change."""
    last = [""]

    def ready(stats: dict) -> bool:
        have = {r: sum(1 for w in stats["workers"] if w["role"] == r) for r in want}
        line = ", ".join(f"{r} {have[r]}/{n}" for r, n in want.items())
        if line != last[0] and progress is not None:
            progress(f"waiting for workers: {line}")
        last[0] = line
        return all(have[r] >= n for r, n in want.items())

    what = "workers registered (" + ", ".join(f"{r} {n}" for r, n in want.items()) + ")"
    check = (lambda: children.check_alive(what=what)) if children is not None else None
    return wait_until(frontend, ready, timeout, what, check, ping_timeout=1.0, interval=0.1, curve=curve)


# ---------------------------------------------------------------------------------------------
# ``broker launch``

def start_gateway(cfg: DisaggConfig, frontend: str, port: Optional[int] = None, models: tuple = (),
                  curve: Optional[CurveClient] = None, api_key: Optional[str] = None):
    """The OpenAI-compatible HTTP gateway on the config's hostname:port (``port`` overrides it),
    in a thread of this process, talking to the broker at ``frontend`` (with ``curve``, the
    broker's own pair: ``auth.self_client``). ``api_key``: the flag's, else the config's, else
    $DSRV_API_KEY. Returns the running ``GatewayThread``; raises OSError when the port cannot be
    bound."""
    from client.gateway import Gateway, GatewayThread     # aiohttp is needed only when serving HTTP
    gw = Gateway(frontend, host=cfg.hostname, port=cfg.port if port is None else port, models=models,
                 min_workers=cfg.min_workers, request_timeout=cfg.broker.request_timeout_s,
                 api_key=api_key_from(api_key, cfg.auth.api_key),
                 metrics_need_key=cfg.auth.metrics_need_key, curve=curve,
                 triton_chat_template=cfg.triton_chat_template,
                 perf_metrics_max_requests=cfg.perf_metrics_max_requests)
    thread = GatewayThread(gw)
    thread.start()
    return thread


def _transfer_backend(options: Any) -> str:
    """The cache_transceiver_config.backend worker options ask for (upper case), or ''."""
    ctc = options.get("cache_transceiver_config") or {} if isinstance(options, dict) else {}
    return str(ctc.get("backend", "")).upper() if isinstance(ctc, dict) else ""


class Launch:
    """The broker (and its HTTP gateway) in this process, the config's workers as children that
    print to this terminal and stop when this process exits."""

    def __init__(self, cfg: DisaggConfig, log_level: str = "INFO", http: bool = True,
                 http_port: Optional[int] = None, advertise_host: Optional[str] = None):
        """``advertise_host``: the host the broker's addresses are published at and given to the
        workers (default: as bound; wildcards: the config's hostname, see broker/addresses.py)."""
        from broker.server import BrokerServer
        self.cfg = cfg
        self.log_level = log_level
        a = cfg.auth
        self.curve = broker_curve(a.curve_key, a.client_keys, a.worker_keys,
                                  tuple(f"{cfg.source}: {n}" for n in CONFIG_NAMES))
        if self.curve is not None and not a.worker_key:
            raise ConfigError(f"{cfg.source}: auth.curve_key is set but auth.worker_key is not: "
                              "`broker launch` gives the workers it starts that key pair")
        self.worker_auth = ([] if self.curve is None else
                            ["--curve-key", a.worker_key, "--curve-server-key", public_file(a.curve_key),
                             "--curve-peers", a.worker_keys])
        uri = cfg.cluster.cluster_uri or ""      # tcp://: the broker's own backend address
        self.server = BrokerServer(cfg.frontend, uri if uri.startswith("tcp://") else cfg.backend_address,
                                   cfg.broker, curve=self.curve, minimum=cfg.minimal_instances,
                                   routing=cfg.routing)
        self.registration = None    # with an etcd:// cluster URI, for workers started elsewhere
        self.thread = threading.Thread(target=self.server.run, name="broker", daemon=True)
        self.http, self.http_port = http, http_port
        self.advertise_host = advertise_host
        self.gateway = None
        self.children = Children(prefix="disagg-launch-")

    @property
    def frontend(self) -> str:
        return self.server.frontend

    def _options_file(self, name: str) -> tuple[Optional[str], Any]:
        """The worker options file of one group and what it holds: the group's own file as is, or
        a merged document that carries where each key came from, so a bad value is reported
        against the user's file."""
        path, doc = worker_options(self.cfg, name)
        if doc is None:
            return path, read_yaml(path, "worker options") if path else None
        out = os.path.join(self.children.tmp.name, f"{name}.yaml")
        with open(out, "w") as f:
            yaml.safe_dump(doc, f)
        return out, doc

    @property
    def http_url(self) -> Optional[str]:
        return self.gateway.gateway.url if self.gateway is not None else None

    def advertised(self) -> tuple:
        """``(frontend, backend, http)`` as published and given to the workers (broker/addresses.py)."""
        return broker_published(self.frontend, self.server.backend, self.http_url, self.advertise_host,
                                self.cfg.hostname)

    def start(self) -> None:
        self.thread.start()
        if self.http:
            self.gateway = start_gateway(self.cfg, self.frontend, self.http_port, (self.cfg.model,),
                                         curve=self_client(self.curve))
        front, back, http = self.advertised()
        self.registration = register_broker(self.cfg.cluster, front, back, http)
        for name, role, group in (("context_servers", "context", self.cfg.context_servers),
                                  ("generation_servers", "generation", self.cfg.generation_servers)):
            opts, options = self._options_file(name)
            # MPI workers join through Open_port/Connect only when each runs under its own
            # `mpiexec.gforker -n 1` (the mpich wheel's, beside python: unlike Hydra's mpiexec
            # it opens no PMI port on 0.0.0.0)
            prefix = ([os.path.join(os.path.dirname(sys.executable), "mpiexec.gforker"), "-n", "1"]
                      if _transfer_backend(options) == "MPI" else [])
            for i in range(group.num_instances):
                # the advertised backend: the workers' KV endpoints then bind to this host's
                # address toward it, which workers on other hosts can reach (broker/addresses.py)
                cmd = worker_command(role, back, self.cfg.model, worker_id=f"{role}-{i}",
                                     options=opts, log_level=self.log_level, exit_with_parent=True,
                                     prefix=prefix, extra=[*self.worker_auth, *group.args])
                proc = self.children.start(f"{name}[{i}] of {self.cfg.source}", cmd, inherit=True)
                log.info("started %s worker %d (pid %d)", role, i, proc.pid)

    def wait_ready(self, timeout: float, progress=print) -> None:
        want = {"context": self.cfg.context_servers.num_instances,
                "generation": self.cfg.generation_servers.num_instances}
        wait_for_workers(self.frontend, want, timeout, self.children, progress, curve=self_client(self.curve))

    def stop(self, grace: float = 10.0) -> None:
        if self.registration is not None:
            self.registration.close()
        self.children.close(grace)
        if self.gateway is not None:
            self.gateway.stop()
        self.server.stop()
        self.thread.join(5)
        self.server.close()


DEMO_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write one sentence about the ocean."}],
]


def run_demo(frontend: str, prompts: list, max_tokens: int = 48, out=print,
             curve: Optional[CurveClient] = None) -> int:
    from client import Client, ClientError
    failures = 0
    with Client(frontend, timeout=300, curve=curve) as c:
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
