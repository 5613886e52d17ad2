"""End to end for every transfer backend: disaggregated output equals aggregated output token for
token; a backend that is not installed is a clear error naming the extra; DEFAULT falls back.

MPI workers each run under their own ``mpiexec.gforker -n 1`` (see transfer/mpi_backend.py); the test
starts them that way and kills the worker processes by pid (they are mpiexec's children).
"""
import logging
import os
import signal
import subprocess
import sys

os.environ.setdefault("UCX_NET_DEVICES", "lo")      # loopback: the workers inherit it

import pytest                                        # noqa: E402
import yaml                                          # noqa: E402

from client import Client                            # noqa: E402
from tests.harness import Deployment, _env           # noqa: E402
from transfer import registry                        # noqa: E402
from transfer.base import BackendUnavailable        # noqa: E402
from transfer.loopback import launcher               # noqa: E402

pytestmark = pytest.mark.timeout(180)

PROMPTS = [{"token_ids": [7]}, {"token_ids": list(range(3, 40))},
           {"token_ids": [(i * 37) % 256 for i in range(150)]}, {"prompt": "Hello, world"}]
SAMPLING = dict(max_tokens=8, ignore_eos=True)


def _why_not(backend):
    try:
        registry.resolve_backend(backend)
    except BackendUnavailable as exc:
        return str(exc)
    return None


# every backend is installed by install.sh: a missing one is a failed install, not a skip
BACKENDS = ["ZMQ", "SHM", "NIXL", "UCX", "MPI"]


def run_all(dep):
    with Client(dep.frontend, timeout=60) as c:
        return [[t for ch in c.stream(**kw, **SAMPLING) for t in ch.token_ids] for kw in PROMPTS]


@pytest.fixture(scope="module")
def aggregated():
    with Deployment() as dep:
        dep.add_worker("both", "both0")
        yield run_all(dep)
        dep.wait_idle()


@pytest.mark.parametrize("backend", BACKENDS)
def test_disaggregated_equals_aggregated(backend, aggregated):
    options = {"cache_transceiver_config": {"backend": backend, "max_tokens_in_buffer": 64}}
    prefix = launcher(backend)
    with Deployment() as dep:
        pids = []
        try:
            procs = [dep.add_worker(role, name, options=options, wait=False, prefix=prefix)
                     for role, name in (("context", "ctx0"), ("generation", "gen0"))]
            stats = dep.wait_for(lambda s: len(s["workers"]) == 2, 120,
                                 "both workers registered")
            pids = [w["pid"] for w in stats["workers"]]
            assert all(p.poll() is None for p in procs)
            assert run_all(dep) == aggregated
            dep.wait_idle()
        finally:
            for pid in pids:                  # the workers themselves, under any launcher
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,extra", [("NIXL", "nixl"), ("UCX", "ucx"), ("MPI", "mpi")])
def test_uninstalled_backend_names_the_extra(backend, extra, monkeypatch):
    """A worker asking for a backend whose library is missing: a clear error naming the extra
    (the library is hidden from the import system, as if not installed)."""
    hidden = {"NIXL": ("nixl_cu12", "nixl"), "UCX": ("ucxx",), "MPI": ("mpi4py",)}[backend]
    real = registry._found
    monkeypatch.setattr(registry, "_found", lambda m: m not in hidden and real(m))
    with pytest.raises(BackendUnavailable) as err:
        registry.resolve_backend(backend)
    assert f"pip install 'disagg-serve[{extra}]'" in str(err.value)
    assert backend in str(err.value)


@pytest.mark.timeout(120)
def test_worker_with_an_uninstalled_backend_exits_with_the_extra_named():
    """The same through a real worker process: its library is made unimportable there."""
    with Deployment() as dep:
        shim = os.path.join(dep.tmp.name, "shim")
        os.makedirs(shim)
        with open(os.path.join(shim, "sitecustomize.py"), "w") as f:
            f.write("import sys\nsys.modules['ucxx'] = None\n")   # import ucxx -> ImportError
        env = _env()
        env["PYTHONPATH"] = shim + os.pathsep + env["PYTHONPATH"]
        path = os.path.join(dep.tmp.name, "gen.yaml")
        with open(path, "w") as f:
            yaml.safe_dump({"cache_transceiver_config": {"backend": "UCX"}}, f)
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "start", "--role", "generation", "--broker",
             dep.backend, "--model", "tiny", "--extra-llm-api-options", path],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        dep.procs.append(proc)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode != 0
        assert "pip install 'disagg-serve[ucx]'" in out, out[-2000:]


def test_default_without_nixl_falls_back_to_zmq_and_logs_it(monkeypatch, caplog):
    real = registry._found
    monkeypatch.setattr(registry, "_found", lambda m: m not in ("nixl_cu12", "nixl") and real(m))
    with caplog.at_level(logging.WARNING, logger="transfer.registry"):
        assert registry.resolve_backend("DEFAULT") == "ZMQ"
    assert "falling back to the ZMQ transfer backend" in caplog.text
    assert "pip install 'disagg-serve[nixl]'" in caplog.text


def test_default_with_nixl_is_nixl():
    assert _why_not("NIXL") is None, _why_not("NIXL")
    assert registry.resolve_backend("DEFAULT") == "NIXL"
