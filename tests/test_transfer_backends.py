"""One suite over every backend: the source in a real child process (under ``mpiexec.gforker -n 1`` for
MPI), the sink in the test process; FAKE runs both in process. A backend whose library is not
installed is skipped, saying which extra provides it."""
import os
import signal
import time

os.environ.setdefault("UCX_NET_DEVICES", "lo")      # loopback: children inherit it

import pytest                                        # noqa: E402
import torch                                         # noqa: E402

from transfer import registry                        # noqa: E402
from transfer.base import BackendUnavailable, KvLayout, TransferError, TransferTimeout, token_view  # noqa: E402,E501
from transfer.config import CacheTransceiverConfig   # noqa: E402
from transfer.loopback import LoopbackSource, fill_pool  # noqa: E402
from transfer.registry import create_sink, create_source  # noqa: E402

SEED = 7
REAL = ["ZMQ", "SHM", "NIXL", "UCX", "MPI"]


def _available(name):
    try:
        registry.resolve_backend(name)
        return None
    except BackendUnavailable as exc:
        return str(exc)


def _params(names):
    # every backend is installed by install.sh: a missing one is a failed install, not a skip
    return list(names)


@pytest.fixture(autouse=True)
def _backend_installed(request):
    name = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if name is not None and _available(name) is not None:
        pytest.fail(f"backend {name} is not usable here: {_available(name)} (run install.sh)")


BACKENDS = _params(REAL + ["FAKE"])
REAL_BACKENDS = _params(REAL)


def layout(block_size=16, **kw):
    base = dict(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=block_size)
    return KvLayout(**{**base, **kw})


class LocalSource:
    """An in-process source with the same calls as LoopbackSource (the FAKE side)."""

    def __init__(self, lay, num_blocks, seed, config):
        self.pool = fill_pool(lay, num_blocks, seed)
        self.source = create_source(CacheTransceiverConfig.from_dict(config), self.pool, lay)

    def register(self, tid, block_ids, num_tokens):
        return self.source.register(tid, block_ids, num_tokens)

    def call(self, op, tid=None, timeout=0.0):
        if op == "release":
            self.source.release(tid)
            return {"num_registered": self.source.num_registered}
        deadline = time.monotonic() + timeout
        events = self.source.poll()
        while not events and time.monotonic() < deadline:
            time.sleep(0.002)
            events = self.source.poll()
        return {"events": [[e.kind, e.transfer_id] for e in events],
                "num_registered": self.source.num_registered}

    def kill(self):
        self.source.close()


class SourceView:
    """One test's view of a shared source: what the test registered is released afterwards."""

    def __init__(self, shared):
        self.shared, self.tids = shared, set()

    def register(self, tid, block_ids, num_tokens):
        self.tids.add(tid)
        return self.shared.register(tid, block_ids, num_tokens)

    def call(self, **cmd):
        return self.shared.call(**cmd)

    def release_all(self):
        for tid in self.tids:
            self.shared.call(op="release", tid=tid)


def _key(backend, lay, config=None):
    config = {"backend": backend, **(config or {})}
    return (backend, lay, tuple(sorted(config.items()))), config


@pytest.fixture(scope="module")
def shared_sources():
    """Sources by (backend, layout, config), started once per module (a child process costs
    seconds of torch import) and stopped at the end. The common ones start all at once."""
    made = {}
    try:
        for backend in REAL:
            if _available(backend) is None:
                for lay in (layout(), layout(8)):
                    key, config = _key(backend, lay)
                    # ten children importing torch at once on 2 cores: their first answer
                    # can take well over the usual 30 s when the machine is busy
                    made[key] = LoopbackSource(lay, 64, SEED, config, wait=False, timeout=120)
        yield made
    finally:
        for src in made.values():
            src.kill()


@pytest.fixture
def sources(shared_sources):
    """make(backend, layout, config) -> this test's view of a source."""
    views = []

    def make(backend, lay, config=None):
        key, config = _key(backend, lay, config)
        old = shared_sources.get(key)
        if isinstance(old, LoopbackSource) and old.proc.poll() is not None:
            old.kill()                # died (killed from outside?): a fresh one, not 30 s waits
            del shared_sources[key]
        if key not in shared_sources:
            shared_sources[key] = (LocalSource(lay, 64, SEED, config) if backend == "FAKE"
                                   else LoopbackSource(lay, 64, SEED, config))
        views.append(SourceView(shared_sources[key]))
        return views[-1]

    yield make
    for view in views:
        view.release_all()


@pytest.fixture
def sinks():
    made = []

    def make(backend, lay, num_blocks=64, **config):
        cfg = CacheTransceiverConfig(backend=backend, **config)
        pool = torch.zeros(num_blocks, lay.num_layers, 2, lay.block_size, lay.num_kv_heads,
                           lay.head_dim, dtype=getattr(torch, lay.dtype))
        sink = create_sink(cfg, pool, lay)
        made.append(sink)
        return sink, pool

    yield make
    for sink in made:
        sink.close()


def wait_results(sink, n=1, timeout=20.0):
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"no result in {timeout} s"
        out += sink.poll()
        time.sleep(0.002)
    return {r.pull_id: r for r in out}


def assert_tokens_equal(src_layout, num_src_blocks, src_ids, dst_pool, dst_layout, dst_ids, n):
    """Token t of the transfer must sit at the same place in the sink's blocks."""
    t = torch.arange(n)
    src = token_view(fill_pool(src_layout, num_src_blocks, SEED).view(torch.uint8)
                     .reshape(num_src_blocks, -1), src_layout)
    dst = token_view(dst_pool.view(torch.uint8).reshape(dst_pool.shape[0], -1), dst_layout)
    want = src[torch.tensor(src_ids)[t // src_layout.block_size], :, :, t % src_layout.block_size]
    got = dst[torch.tensor(dst_ids)[t // dst_layout.block_size], :, :, t % dst_layout.block_size]
    assert torch.equal(want, got)


CASES = [  # (source block ids, number of tokens, destination block ids)
    ([5], 1, [0]),
    ([9, 3, 4, 5, 20], 70, [1, 2, 3, 40, 41]),
    ([30, 31, 32, 33, 34, 35, 36, 37, 38, 39], 160, [50, 51, 52, 53, 54, 10, 11, 12, 13, 14]),
    ([63, 0, 17], 35, [60, 61, 62]),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trips_are_byte_exact(backend, sources, sinks):
    lay = layout()
    src = sources(backend, lay)
    sink, pool = sinks(backend, lay)
    for i, (src_ids, n, dst_ids) in enumerate(CASES):     # all pulls in flight together
        sink.start_pull(f"p{i}", src.register(f"t{i}", src_ids, n), dst_ids)
    results = wait_results(sink, len(CASES))
    for i, (src_ids, n, dst_ids) in enumerate(CASES):
        r = results[f"p{i}"]
        assert r.ok, r.error
        assert r.nbytes == len(src_ids) * lay.block_nbytes and r.seconds >= 0
        assert_tokens_equal(lay, 64, src_ids, pool, lay, dst_ids, n)
    assert sink.num_active == 0
    events, deadline = set(), time.monotonic() + 20
    while len(events) < len(CASES) and time.monotonic() < deadline:
        events |= {tuple(e) for e in src.call(op="wait_events", timeout=5.0)["events"]}
    assert events == {("pulled", f"t{i}") for i in range(len(CASES))}
    assert src.call(op="poll")["num_registered"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_transfers_longer_than_the_buffer_go_in_rounds(backend, sources, sinks):
    lay = layout()
    src = sources(backend, lay)
    sink, pool = sinks(backend, lay, max_tokens_in_buffer=32)
    src_ids, dst_ids = list(range(40, 60)), [3, 4, 5] + list(range(20, 37))
    sink.start_pull("p", src.register("t", src_ids, 315), dst_ids)
    assert wait_results(sink)["p"].ok
    assert sink.rounds_done == 10
    assert_tokens_equal(lay, 64, src_ids, pool, lay, dst_ids, 315)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("src_bs,dst_bs,buffer", [(16, 32, 64), (16, 8, 8), (16, 8, None),
                                                  (8, 24, 48)])
def test_different_block_sizes_are_exact_token_wise(backend, src_bs, dst_bs, buffer, sources,
                                                    sinks):
    src_lay, dst_lay = layout(src_bs), layout(dst_bs)
    n = 150
    src_ids = list(range(63, 63 - src_lay.blocks_for(n), -1))
    dst_ids = list(range(2, 2 + dst_lay.blocks_for(n)))
    src = sources(backend, src_lay)
    sink, pool = sinks(backend, dst_lay, max_tokens_in_buffer=buffer)
    sink.start_pull("p", src.register("t", src_ids, n), dst_ids)
    r = wait_results(sink)["p"]
    assert r.ok, r.error
    assert_tokens_equal(src_lay, 64, src_ids, pool, dst_lay, dst_ids, n)
    untouched = [b for b in range(64) if b not in dst_ids]
    assert not pool[untouched].any()


# Half-precision KV (kv_cache_config.dtype) through every backend: bfloat16 everywhere and
# float16 in process; both are 2-byte rows to the transfer, which never converts (float16 through
# ZMQ is also served end to end in tests/test_kv_dtype.py). One source child each.
HALF = [(b, "bfloat16") for b in BACKENDS] + [("FAKE", "float16")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,dtype", HALF)
def test_half_precision_kv_moves_byte_exact_also_between_block_sizes(backend, dtype, sources,
                                                                      sinks):
    src_lay, dst_lay = layout(dtype=dtype), layout(8, dtype=dtype)
    assert src_lay.block_nbytes * 2 == layout().block_nbytes
    src = sources(backend, src_lay)
    same, same_pool = sinks(backend, src_lay)
    staged, staged_pool = sinks(backend, dst_lay, max_tokens_in_buffer=16)
    src_ids, n, dst_ids = CASES[2]
    same.start_pull("p", src.register("t", src_ids, n), dst_ids)
    r = wait_results(same)["p"]        # one after the other: a sink's poll() is its progress
    staged_ids = list(range(2, 2 + dst_lay.blocks_for(n)))
    staged.start_pull("q", src.register("u", src_ids, n), staged_ids)
    q = wait_results(staged)["q"]
    assert r.ok and q.ok, (r.error, q.error)
    assert r.nbytes == len(src_ids) * src_lay.block_nbytes
    assert same_pool.dtype == staged_pool.dtype == getattr(torch, dtype)
    assert_tokens_equal(src_lay, 64, src_ids, same_pool, src_lay, dst_ids, n)
    assert_tokens_equal(src_lay, 64, src_ids, staged_pool, dst_lay, staged_ids, n)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("field,value,words", [("dtype", "float16", ["float16", "float32"]),
                                               ("num_kv_heads", 4, ["4", "2", "KV heads"])])
def test_incompatible_layout_raises_at_once(backend, field, value, words, sources, sinks):
    src = sources(backend, layout())
    sink, _ = sinks(backend, layout())
    handle = src.register("t", [1, 2], 20)     # as a context worker of another layout says
    handle["layout"] = {**handle["layout"], field: value}
    with pytest.raises(TransferError) as err:
        sink.start_pull("p", handle, [0, 1])
    assert all(w in str(err.value) for w in words) and "context worker" in str(err.value)
    assert sink.num_active == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_destination_raises_at_once(backend, sources, sinks):
    src = sources(backend, layout())
    sink, _ = sinks(backend, layout())
    handle = src.register("t", [1, 2], 20)
    with pytest.raises(TransferError, match="dest_block_ids has 1 blocks"):
        sink.start_pull("p", handle, [0])
    with pytest.raises(TransferError, match="out of range"):
        sink.start_pull("p", handle, [0, 64])
    with pytest.raises(TransferError, match="malformed KV handle"):
        sink.start_pull("p", {k: v for k, v in handle.items() if k != "endpoint"}, [0, 1])
    assert sink.num_active == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_past_the_last_token_are_neither_served_nor_written(backend, sources, sinks):
    src = sources(backend, layout())
    sink, pool = sinks(backend, layout())
    handle = src.register("t", [4, 9, 11], 20)               # a third block reserved for later
    assert handle["block_ids"] == [4, 9] and handle["num_tokens"] == 20
    sink.start_pull("p", handle, [0, 1, 2, 3])
    assert wait_results(sink)["p"].ok
    assert_tokens_equal(layout(), 64, [4, 9], pool, layout(), [0, 1], 20)
    assert not pool[2:].any()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_released_transfer_fails_cleanly_and_release_is_idempotent(backend, sources, sinks):
    src = sources(backend, layout())
    sink, pool = sinks(backend, layout())
    handle = src.register("t", [1, 2], 20)
    assert src.call(op="release", tid="t")["num_registered"] == 0
    assert src.call(op="release", tid="t")["num_registered"] == 0
    assert src.call(op="release", tid="never")["num_registered"] == 0
    sink.start_pull("p", handle, [0, 1])
    r = wait_results(sink)["p"]
    assert not r.ok and isinstance(r.error, TransferError)
    assert "no longer holds the KV for transfer 't'" in str(r.error)
    assert sink.num_active == 0 and not pool.any()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pulled_transfer_cannot_be_pulled_again(backend, sources, sinks):
    src = sources(backend, layout())
    sink, _ = sinks(backend, layout())
    handle = src.register("t", [1, 2], 20)
    sink.start_pull("p1", handle, [0, 1])
    assert wait_results(sink)["p1"].ok
    assert src.call(op="wait_events", timeout=10.0)["events"] == [["pulled", "t"]]
    sink.start_pull("p2", handle, [2, 3])
    assert "no longer holds" in str(wait_results(sink)["p2"].error)


@pytest.mark.timeout(60)
def test_fake_timeout_expires_both_sides(sources, sinks):
    src = sources("FAKE", layout(), config={"kv_transfer_timeout_ms": 200})
    sink, pool = sinks("FAKE", layout(), kv_transfer_timeout_ms=200)
    sink.delay_s = 30.0
    sink.start_pull("p", src.register("t", [1, 2], 20), [0, 1])
    assert sink.num_active == 1
    r = wait_results(sink)["p"]
    assert isinstance(r.error, TransferTimeout) and r.error.code == "KV_TRANSFER_TIMEOUT"
    assert "timed out" in str(r.error) and "kv_transfer_timeout_ms=200" in str(r.error)
    answer = src.call(op="wait_events", timeout=5.0)
    assert answer["events"] == [["expired", "t"]] and answer["num_registered"] == 0
    assert sink.num_active == 0 and not pool.any()


@pytest.mark.timeout(60)
def test_fake_failure_injection(sources, sinks):
    src = sources("FAKE", layout())
    sink, pool = sinks("FAKE", layout())
    sink.fail_with = "injected"
    sink.start_pull("p", src.register("t", [1, 2], 20), [0, 1])
    r = wait_results(sink)["p"]
    assert not r.ok and str(r.error) == "injected" and not pool.any()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cancel_stops_writes_and_reports_nothing(backend, sources, sinks):
    src = sources(backend, layout())
    sink, pool = sinks(backend, layout(), max_tokens_in_buffer=16)
    sink.start_pull("p", src.register("t", list(range(60)), 960), list(range(60)))
    sink.cancel("p")
    sink.cancel("p")
    assert sink.num_active == 0
    snapshot = pool.clone()
    second = src.register("u", [1], 16)           # the sink keeps working afterwards
    sink.start_pull("q", second, [63])
    results = wait_results(sink)
    assert list(results) == ["q"] and results["q"].ok
    assert torch.equal(pool[:63].view(torch.uint8), snapshot[:63].view(torch.uint8))


def stop(src, timeout=10.0):
    """SIGSTOP the source and wait until the kernel reports it stopped (delivery is async)."""
    src.signal(signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{src.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in "Tt":
                return
        assert time.monotonic() < deadline, "the source did not stop"
        time.sleep(0.001)


BIG = KvLayout(num_layers=2, num_kv_heads=2, head_dim=128, dtype="float32", block_size=16)


def _poll_until(sink, pred, timeout=20.0):
    """Poll the sink until ``pred()``; returns the results seen meanwhile."""
    out, deadline = [], time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        out += sink.poll()
        time.sleep(0.001)
    return out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_timeout_expires_both_sides(backend, sinks):
    """A stopped context worker: the pull fails with a timeout that says so, the late answer is
    not used, and the source expires the transfer; nothing stays registered on either side."""
    config = {"backend": backend, "kv_transfer_timeout_ms": 600}
    with LoopbackSource(layout(), 64, SEED, config) as src:
        handle = src.register("t", [1, 2], 20)
        sink, pool = sinks(backend, layout(), kv_transfer_timeout_ms=600)
        stop(src)
        try:
            started = time.monotonic()
            sink.start_pull("p", handle, [0, 1])
            r = wait_results(sink)["p"]
            assert isinstance(r.error, TransferTimeout) and r.error.code == "KV_TRANSFER_TIMEOUT"
            assert "timed out" in str(r.error) and "kv_transfer_timeout_ms=600" in str(r.error)
            assert time.monotonic() - started < 10 and sink.num_active == 0
        finally:
            src.signal(signal.SIGCONT)
        events, deadline = set(), time.monotonic() + 20
        while ("expired", "t") not in events:
            assert time.monotonic() < deadline, events
            events |= {tuple(e) for e in src.call(op="wait_events", timeout=5.0)["events"]}
        assert src.call(op="poll")["num_registered"] == 0
        assert sink.poll() == [] and sink.num_active == 0 and not pool.any()
        second = src.register("u", [3, 4], 20)         # the pair still works afterwards
        sink.start_pull("q", second, [5, 6])
        assert wait_results(sink)["q"].ok
        assert_tokens_equal(layout(), 64, [3, 4], pool, layout(), [5, 6], 20)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_source_killed_mid_transfer_fails_cleanly(backend, sinks):
    config = {"backend": backend, "kv_transfer_timeout_ms": 30_000}
    with LoopbackSource(BIG, 256, SEED, config) as src:
        handle = src.register("t", list(range(256)), 256 * 16)
        sink, _ = sinks(backend, BIG, num_blocks=256, max_tokens_in_buffer=16,
                        kv_transfer_timeout_ms=30_000)
        sink.start_pull("p", handle, list(range(256)))
        early = _poll_until(sink, lambda: sink.rounds_done >= 1)
        assert early == [] and sink.num_active == 1, "the transfer finished before the kill"
        killed = time.monotonic()
        src.kill()
        r = wait_results(sink)["p"]
    assert not r.ok and isinstance(r.error, TransferError)
    assert not isinstance(r.error, TransferTimeout), r.error
    assert "context worker" in str(r.error), r.error
    assert time.monotonic() - killed < 10 and sink.num_active == 0


@pytest.mark.timeout(60)
def test_shm_refuses_a_handle_from_another_host(sources, sinks):
    src = sources("SHM", layout())
    sink, _ = sinks("SHM", layout())
    handle = dict(src.register("t", [1, 2], 20), host="another-machine-boot")
    with pytest.raises(TransferError, match="only between workers on one host.*another-machine"):
        sink.start_pull("p", handle, [0, 1])
    assert sink.num_active == 0
