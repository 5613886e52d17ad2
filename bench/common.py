"""What every benchmark shares: child processes killed by pid, readiness with deadlines,
percentiles, tables, JSON, and a progress bar on stderr.

Benchmarks use the project's public entry points only (``broker.cli``, ``workers.cli``,
``broker.protocol``, ``client``); nothing here asserts a timing.
"""
from __future__ import annotations

import json
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable, Optional, Sequence

# Cheap multipart send and receive for load generators and null workers: the broker's own.
# pyzmq's send_multipart/recv_multipart cost several times more, and the load generator must
# cost as little as possible, since it shares the cores with the broker.
from broker.server import quiet_gc, recv_frames, send_frames  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def parse_cpus(text: str) -> set:
    """``"1"``, ``"0,2-3"`` to a set of CPU numbers (as ``taskset -c`` reads them)."""
    cpus: set = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"invalid CPU list {text!r}: expected numbers and ranges such as 1 or 0,2-3") from None
    if not cpus or min(cpus) < 0:
        raise ValueError(f"invalid CPU list {text!r}: expected numbers >= 0")
    return cpus


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class Procs:
    """Child processes with their logs in a temporary folder; ``close()`` stops every one by pid
    (SIGTERM, then SIGKILL after ``grace`` seconds) and always runs, even after an error."""

    def __init__(self, prefix: str = "bench-"):
        self.tmp = tempfile.TemporaryDirectory(prefix=prefix)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, str] = {}

    def start(self, name: str, cmd: Sequence[str], stdout=None, stdin=None) -> subprocess.Popen:
        path = os.path.join(self.tmp.name, f"{name}.log")
        log = open(path, "w")
        self.logs[name] = path
        proc = subprocess.Popen(list(cmd), stdout=stdout if stdout is not None else log,
                                stderr=log if stdout is not None else subprocess.STDOUT,
                                stdin=stdin, env=child_env(), text=True, cwd=ROOT)
        log.close()   # the child holds its own copy
        self.procs[name] = proc
        return proc

    def tail(self, name: str, n: int = 30) -> str:
        try:
            with open(self.logs[name]) as f:
                return "".join(f.readlines()[-n:])
        except (OSError, KeyError):
            return ""

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} (pid {proc.pid}) exited with code {proc.returncode}:\n"
                                   f"{self.tail(name)}")

    def stop(self, name: str, grace: float = 5.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            _stop([proc], grace)

    def close(self, grace: float = 5.0) -> None:
        _stop(list(self.procs.values()), grace)
        self.procs.clear()
        self.tmp.cleanup()

    def __enter__(self) -> "Procs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop(procs: list, grace: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
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
        raise RuntimeError(f"pid {proc.pid} exited (code {proc.poll()}) before its {what}")
    return line.strip()


def start_broker(procs: Procs, http: bool = False, extra: Sequence[str] = (), name: str = "broker",
                 timeout: float = 30.0) -> dict:
    """``broker start`` on free ports, with its HTTP gateway on a free port or none; returns the
    ``key=value`` words of its ready line (frontend, backend, http) and its pid."""
    cmd = [sys.executable, "-m", "broker.cli", "start", "--frontend", "tcp://127.0.0.1:0",
           "--backend", "tcp://127.0.0.1:0", "--log-level", "WARNING",
           *(["--http-port", "0"] if http else ["--no-http"]), *extra]
    proc = procs.start(name, cmd, stdout=subprocess.PIPE)
    try:
        line = read_line(proc, timeout, "ready line")
    except (TimeoutError, RuntimeError) as e:
        raise RuntimeError(f"{e}\n{procs.tail(name)}") from None
    if not line.startswith("broker ready"):
        raise RuntimeError(f"unexpected first line from the broker: {line!r}\n{procs.tail(name)}")
    words = dict(w.split("=", 1) for w in line.split() if "=" in w)
    words["pid"] = proc.pid
    return words


def wait_for_workers(frontend: str, want: dict, timeout: float, procs: Optional[Procs] = None,
                     progress: Callable[[str], None] = lambda s: None) -> dict:
    """Until the broker reports at least ``want[role]`` registered workers of each role."""
    from broker.launch import ping
    deadline = time.monotonic() + timeout
    last = None
    while True:
        if procs is not None:
            procs.check_alive()
        stats = ping(frontend, timeout=1.0) or {"workers": []}
        have = {r: sum(1 for w in stats["workers"] if w["role"] == r) for r in want}
        line = ", ".join(f"{r} {have[r]}/{n}" for r, n in want.items())
        if line != last:
            progress(f"waiting for workers: {line}")
            last = line
        if all(have[r] >= n for r, n in want.items()):
            return stats
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not ready after {timeout:g} s ({line})")
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux ``/proc``); NaN elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# ---------------------------------------------------------------------------------------------
# statistics and reporting

def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of already sorted values; NaN when empty."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summarize(values: Iterable[float], scale: float = 1.0) -> dict:
    """mean, p50, p90, p99, min, max and count of the values, each multiplied by ``scale``."""
    v = sorted(x * scale for x in values if x is not None and not math.isnan(x))
    if not v:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None}
    return {"count": len(v), "mean": sum(v) / len(v), "p50": percentile(v, 50),
            "p90": percentile(v, 90), "p99": percentile(v, 99), "min": v[0], "max": v[-1]}


def median(values: Iterable[float]) -> Optional[float]:
    v = sorted(x for x in values if x is not None and not math.isnan(x))
    return percentile(v, 50) if v else None


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain-text table; floats get 4 significant digits, None prints as '-'."""
    def cell(x) -> str:
        if x is None:
            return "-"
        if isinstance(x, float):
            if math.isnan(x):
                return "-"
            return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)
    text = [[cell(x) for x in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in text)])


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def machine() -> dict:
    import platform
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class Progress:
    """A one-line progress bar on stderr (redrawn at most 10 times a second; plain lines when
    stderr is not a terminal, so logs stay readable)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.n = max(1, total), label, 0
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.monotonic()
        self.extra = ""
        self._last_pct = -1

    def update(self, n: int = 1, extra: str = "") -> None:
        self.n += n
        if extra:
            self.extra = extra
        now = time.monotonic()
        if self.enabled and (now - self.last >= 0.1 or self.n >= self.total):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(1.0, self.n / self.total)
        if self.tty:
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.n}/{self.total} "
                             f"{now - self.t0:6.1f}s {self.extra}\x1b[K")
        else:
            pct = int(frac * 10) * 10
            if pct == self._last_pct:
                return
            self._last_pct = pct
            sys.stderr.write(f"{self.label}: {self.n}/{self.total} ({pct}%) {now - self.t0:.1f}s {self.extra}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            if self.tty:
                sys.stderr.write("\n")
                sys.stderr.flush()
