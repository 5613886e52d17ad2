"""A KV source in a child process, driven by JSON lines: for tests and the transfer benchmark.

``python -m transfer.loopback serve SPEC`` fills a pool with seeded random bytes, serves it with
the configured backend, prints ``{"endpoint", "pid"}`` and then answers one JSON line per command
line on stdin: register, release, poll, wait_events. Plain JSON on pipes, never pickle.
``LoopbackSource`` is the parent's side: it starts the child, waits for it with a deadline on
every answer, and kills it by pid. ``python -m transfer.loopback bench`` times one pull between
two processes against a numpy memcpy of the same size, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from .base import KvLayout


def fill_pool(layout: KvLayout, num_blocks: int, seed: int) -> torch.Tensor:
    """A pool of ``num_blocks`` blocks of reproducible random bytes."""
    data = np.random.default_rng(seed).integers(0, 256, num_blocks * layout.block_nbytes,
                                                dtype=np.uint8)
    shape = (num_blocks, layout.num_layers, 2, layout.block_size, layout.num_kv_heads,
             layout.head_dim)
    return torch.from_numpy(data).view(getattr(torch, layout.dtype)).view(shape)


def _serve(spec: dict) -> None:
    from .config import CacheTransceiverConfig
    from .registry import create_source

    # answers go on a private copy of stdout: libraries (UCX, MPI) print on fd 1
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    torch.set_num_threads(1)
    layout = KvLayout.from_dict(spec["layout"])
    pool = fill_pool(layout, spec["num_blocks"], spec["seed"]).to(spec.get("device", "cpu"))
    cfg = CacheTransceiverConfig.from_dict(spec.get("config"))
    source = create_source(cfg, pool, layout)
    say = lambda obj: print(json.dumps(obj), file=answers, flush=True)   # noqa: E731
    say({"endpoint": source.endpoint, "pid": os.getpid()})
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            op = cmd["op"]
            if op == "register":
                say({"handle": source.register(cmd["tid"], cmd["block_ids"], cmd["num_tokens"])})
            elif op == "release":
                source.release(cmd["tid"])
                say({"num_registered": source.num_registered})
            elif op in ("poll", "wait_events"):
                deadline = time.monotonic() + cmd.get("timeout", 0)
                events = source.poll()
                while not events and time.monotonic() < deadline:
                    time.sleep(0.005)               # the worker loop's iteration
                    events = source.poll()
                say({"events": [[e.kind, e.transfer_id] for e in events],
                     "num_registered": source.num_registered})
            else:
                say({"error": f"unknown op {op!r}"})
        except Exception as exc:                    # answer, so the parent never hangs
            say({"error": f"{type(exc).__name__}: {exc}"})
    source.close()


def launcher(backend: str) -> list:
    """The command prefix a worker of this backend needs: MPI workers each run under their own
    ``mpiexec.gforker -n 1`` (MPICH's, next to this python; Hydra's ``mpiexec`` would also work
    but listens on 0.0.0.0 for its PMI proxies)."""
    if backend != "MPI":
        return []
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec.gforker")
    return [mpiexec if os.path.exists(mpiexec) else "mpiexec", "-n", "1"]


class LoopbackSource:
    """The parent's handle on a ``serve`` child. Use as a context manager: the child is killed
    by pid on exit whatever happened."""

    def __init__(self, layout: KvLayout, num_blocks: int, seed: int, config: dict | None = None,
                 *, timeout: float = 30.0, wait: bool = True, device: str = "cpu") -> None:
        """``wait=False`` returns at once (start several children in parallel); the child's
        hello is then awaited on first use. ``device``: where the child's pool lives."""
        spec = {"layout": layout.to_dict(), "num_blocks": num_blocks, "seed": seed,
                "config": config, "device": device}
        self.timeout = timeout
        backend = str((config or {}).get("backend", "")).upper()
        self.proc = subprocess.Popen(
            launcher(backend) + [sys.executable, "-m", "transfer.loopback", "serve",
                                 json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.pid = self.proc.pid       # the serving python process, once it said hello
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.endpoint = None
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        if self.endpoint is not None:
            return
        try:
            hello = self._answer()
            self.endpoint, self.pid = hello["endpoint"], hello["pid"]
        except BaseException:
            self.kill()
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _answer(self) -> dict:
        try:
            line = self._lines.get(timeout=self.timeout)
        except queue.Empty:
            raise TimeoutError(f"loopback source pid {self.pid}: no answer in {self.timeout} s")
        if line is None:
            self._lines.put(None)                   # every later call fails at once, too
            raise RuntimeError(f"loopback source pid {self.pid} exited ({self.proc.poll()})")
        return json.loads(line)

    def call(self, **cmd) -> dict:
        self.wait_ready()
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def register(self, tid: str, block_ids: list, num_tokens: int) -> dict:
        answer = self.call(op="register", tid=tid, block_ids=block_ids, num_tokens=num_tokens)
        return answer["handle"]

    def signal(self, sig: int) -> None:
        self.wait_ready()
        os.kill(self.pid, sig)

    def kill(self) -> None:
        for pid in dict.fromkeys((self.pid, self.proc.pid)):   # the server, then a launcher
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def __enter__(self) -> "LoopbackSource":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def _bench(mib: int, backend: str, repeats: int) -> dict:
    from .config import CacheTransceiverConfig
    from .registry import create_sink

    if backend.upper() == "FAKE":
        raise SystemExit("the FAKE backend is in-process only: it cannot pull from a child")
    torch.set_num_threads(1)
    layout = KvLayout(num_layers=8, num_kv_heads=8, head_dim=128, dtype="float32", block_size=16)
    blocks = mib * (1 << 20) // layout.block_nbytes
    nbytes = blocks * layout.block_nbytes
    config = {"backend": backend, "max_tokens_in_buffer": blocks * layout.block_size}
    cfg = CacheTransceiverConfig.from_dict(config)
    pool = torch.zeros(blocks, 8, 2, 16, 8, 128)
    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.empty(nbytes, np.uint8)
    memcpy = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        memcpy.append(time.perf_counter() - t)
    pulls = []
    with LoopbackSource(layout, blocks, 1, config) as source:
        sink = create_sink(cfg, pool, layout)
        try:
            for r in range(repeats):
                handle = source.register(f"bench-{r}", list(range(blocks)), blocks * 16)
                t = time.perf_counter()
                sink.start_pull(f"bench-{r}", handle, list(range(blocks)))
                results = []
                while not results:
                    results = sink.poll()
                    time.sleep(0.0005)
                pulls.append(time.perf_counter() - t)
                if not results[0].ok:
                    raise results[0].error
                source.call(op="release", tid=f"bench-{r}")
            ok = torch.equal(pool.view(torch.uint8), fill_pool(layout, blocks, 1).view(torch.uint8))
        finally:
            sink.close()
    gbs = lambda s: nbytes / min(s) / 1e9   # noqa: E731
    return {"backend": backend, "bytes": nbytes, "pull_GBps": round(gbs(pulls), 2),
            "memcpy_GBps": round(gbs(memcpy), 2), "exact": ok, "repeats": repeats}


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m transfer.loopback")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve").add_argument("spec")
    bench = sub.add_parser("bench")
    bench.add_argument("--mib", type=int, default=256)
    bench.add_argument("--backend", default="ZMQ", help="a backend that crosses processes")
    bench.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        _serve(json.loads(args.spec))
    else:
        print(json.dumps(_bench(args.mib, args.backend, args.repeats)))


if __name__ == "__main__":
    main()
