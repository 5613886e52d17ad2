"""The package rules of docs/architecture.md §4, read from the source: who may import whom, and
which modules stay pure (no sockets, no clock of their own, no torch)."""
import ast
import os

import pytest

from tests.harness import ROOT

PACKAGES = ("broker", "workers", "transfer", "client")


def imports(path: str) -> set:
    """Every module name a file imports, absolute (relative imports resolved)."""
    tree = ast.parse(open(path).read(), path)
    pkg = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def files(package: str):
    for dirpath, _, names in os.walk(os.path.join(ROOT, package)):
        for n in names:
            if n.endswith(".py"):
                yield os.path.join(dirpath, n)


# the composition root: `broker launch` and `broker start` serve the HTTP gateway beside the broker
WIRING = {"broker/launch.py": ("client",), "broker/cli.py": ("client",)}


def offenders(package: str, forbidden) -> list:
    out = []
    for f in files(package):
        rel = os.path.relpath(f, ROOT)
        allowed = WIRING.get(rel, ())
        out += [f"{rel} imports {m}" for m in imports(f)
                if any(m == x or m.startswith(x + ".") for x in forbidden)
                and not any(m == a or m.startswith(a + ".") for a in allowed)]
    return sorted(out)


@pytest.mark.parametrize("package,forbidden", [
    ("broker", ("workers", "transfer", "torch", "client")),
    ("client", ("workers", "transfer", "torch")),
    ("transfer", ("workers", "client", "broker.protocol", "broker.state", "broker.server", "broker.launch")),
])
def test_arrows_point_one_way(package, forbidden):
    assert offenders(package, forbidden) == []


@pytest.mark.parametrize("module", ["broker/state.py", "broker/records.py", "broker/pool.py", "broker/routers.py",
                                    "broker/kv_index.py", "broker/kv_keys.py", "workers/scheduler.py",
                                    "workers/sequence.py", "workers/engine/block_allocator.py",
                                    "workers/engine/prefix_cache.py", "transfer/plan.py",
                                    "broker/protocol.py", "broker/wire.py", "transfer/messages.py"])
def test_pure_modules_do_no_io(module):
    path = os.path.join(ROOT, module)
    bad = {m for m in imports(path) if m.split(".")[0] in ("zmq", "socket", "torch", "subprocess", "threading")}
    assert bad == set(), f"{module} imports {bad}"
    src = open(path).read()
    assert "time.monotonic(" not in src and "time.time(" not in src, f"{module} reads a clock of its own"


def test_no_product_module_over_600_lines():
    long = [(os.path.relpath(f, ROOT), n) for p in PACKAGES for f in files(p)
            if (n := sum(1 for _ in open(f))) > 600]
    assert long == []


def test_the_kv_keys_both_sides_hash_with_need_only_the_standard_library():
    """broker/kv_keys.py is the one definition of the KV block keys, imported by the workers'
    prefix cache and by the broker's routers: it may depend on nothing of either side."""
    path = os.path.join(ROOT, "broker/kv_keys.py")
    assert imports(path) <= {"__future__", "sys", "array", "hashlib", "typing"}
