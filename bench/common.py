"""What every benchmark shares: the launcher run from this tree (child processes killed by pid,
readiness read from the broker), percentiles, tables, JSON, and a tqdm progress bar on stderr.

Benchmarks use the project's public entry points only (``broker.cli``, ``workers.cli``,
``broker.protocol``, ``client``); nothing here asserts a timing.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import types
from typing import Iterable, Optional, Sequence

from tqdm import tqdm

from broker import launch
from broker.launch import Children

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
    return launch.child_env(ROOT)


def children(prefix: str = "bench-") -> Children:
    """Child processes for one benchmark (the launcher's, run from this tree): ``close()`` stops
    every one by pid (SIGTERM, then SIGKILL after a grace period) and always runs."""
    return Children(prefix=prefix, env=child_env(), cwd=ROOT)


def start_broker(procs: Children, http: bool = False, extra: Sequence[str] = ()) -> dict:
    """``broker start`` on free ports, logging warnings only (benchmarks read its ready line)."""
    return launch.start_broker(procs, http=http, log_level="WARNING", extra=extra)


def module_at(rev: str, path: str) -> types.ModuleType:
    """The module ``path`` (``workers/engine/runner.py``) as it is at git revision ``rev``: the
    baseline a micro-benchmark measures this tree against, with no copy of old code in the tree.
    Its relative imports resolve to this tree's siblings (it runs inside the same package)."""
    try:
        src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"baseline revision {rev!r}: git show {rev}:{path} failed: {e.stderr.strip()}") from None
    package = os.path.dirname(path).replace("/", ".")
    mod = types.ModuleType(f"{package}._baseline_{os.path.basename(path)[:-3]}")
    mod.__package__ = package
    exec(compile(src, f"{rev}:{path}", "exec"), mod.__dict__)
    return mod


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


def progress(total: int, label: str, enabled: bool = True) -> tqdm:
    """A progress bar on stderr for ``total`` steps; off when asked, or when stderr is not a
    terminal (so logs and captured output stay clean)."""
    return tqdm(total=total, desc=label, unit="req", file=sys.stderr, dynamic_ncols=True,
                disable=True if not enabled else None)
