"""GPU memory through the transfer interface: torch CUDA pools and CuPy arrays (NIXL VRAM, UCX's
CUDA transports). Skipped, saying why, where CUDA is absent."""
import os
import time

os.environ.setdefault("UCX_NET_DEVICES", "lo")

import pytest                                        # noqa: E402
import torch                                         # noqa: E402

from transfer import registry                        # noqa: E402
from transfer.base import BackendUnavailable, KvLayout, TransferError  # noqa: E402
from transfer.config import CacheTransceiverConfig   # noqa: E402
from transfer.loopback import fill_pool              # noqa: E402
from transfer.registry import create_sink, create_source  # noqa: E402

LAYOUT = KvLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=16)
NO_CUDA = "CUDA is absent: torch.cuda.is_available() is False (no GPU or no CUDA build of torch)"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


def _installed(backend):
    try:
        registry.resolve_backend(backend)
        return True
    except BackendUnavailable:
        return False


def _pull(backend, src_pool, dst_pool, layout=LAYOUT):
    cfg = CacheTransceiverConfig(backend=backend, kv_transfer_timeout_ms=30_000)
    source = create_source(cfg, src_pool, layout)
    sink = create_sink(cfg, dst_pool, layout)
    try:
        sink.start_pull("p", source.register("t", [3, 4, 9], 40), [0, 1, 2])
        deadline, results = time.monotonic() + 30, []
        while not results:
            assert time.monotonic() < deadline, "no result"
            results = sink.poll()
        assert results[0].ok, results[0].error
        deadline = time.monotonic() + 10
        while source.num_registered:
            assert time.monotonic() < deadline
            source.poll()
            time.sleep(0.001)
    finally:
        sink.close()
        source.close()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])   # kv_cache_config.dtype
@pytest.mark.parametrize("backend", ["NIXL", "UCX"])
def test_cuda_pools_round_trip(backend, dtype):
    if not _installed(backend):
        pytest.skip(f"{backend} is not installed")
    layout = KvLayout(**{**LAYOUT.to_dict(), "dtype": dtype})
    src = fill_pool(layout, 16, 3).cuda()
    dst = torch.zeros_like(src)
    _pull(backend, src, dst, layout)
    assert torch.equal(dst[:3].view(torch.uint8), src[[3, 4, 9]].view(torch.uint8))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["NIXL", "UCX"])
def test_cupy_arrays_go_through_the_same_interface(backend):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    if not _installed(backend):
        pytest.skip(f"{backend} is not installed")
    shape = (16, 2, 2, 16, 2, 8)
    src = cupy.asarray(fill_pool(LAYOUT, 16, 4).numpy())
    dst = cupy.zeros(shape, dtype=cupy.float32)
    _pull(backend, torch.as_tensor(src, device="cuda"), torch.as_tensor(dst, device="cuda"))
    assert bool((dst[:3] == src[cupy.asarray([3, 4, 9])]).all())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["SHM", "MPI", "ZMQ"])
def test_host_only_backends_refuse_a_cuda_pool_clearly(backend):
    if not _installed(backend):
        pytest.skip(f"{backend} is not installed")
    with pytest.raises(TransferError, match="KV pool is on device cuda"):
        create_sink(CacheTransceiverConfig(backend=backend), fill_pool(LAYOUT, 4, 1).cuda(),
                    LAYOUT)


def test_the_skip_reason_says_cuda_is_absent():
    """Guards the message the GPU tests skip with on machines like CI's."""
    assert "CUDA is absent" in NO_CUDA
