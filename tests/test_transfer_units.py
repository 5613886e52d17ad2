"""Pure parts of the transfer package: planning, layout, handle, config, backend selection, the
control channel's messages, the SHM plane's copy."""
import logging

import numpy as np
import pytest
import torch

from transfer import messages as m
from transfer import registry
from transfer import shm_backend as shm
from transfer.base import BackendUnavailable, KvLayout, TransferError, parse_handle, pool_bytes
from transfer.config import CacheTransceiverConfig, ConfigError
from transfer.plan import Segment, merge_segments, plan_rounds, split_frames, token_runs

LAYOUT = KvLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=16)


def test_merge_segments_joins_runs_contiguous_on_both_sides():
    assert merge_segments([3, 4, 5, 9, 10, 2], [0, 1, 7, 8, 9, 3]) == [
        Segment(3, 0, 2), Segment(5, 7, 1), Segment(9, 8, 2), Segment(2, 3, 1)]


def test_plan_rounds_caps_blocks_per_round_and_stages_from_slot_zero():
    rounds = plan_rounds([1, 2, 3, 4, 5], [10, 11, 12, 13, 14], 2)
    assert [(r.first, r.count) for r in rounds] == [(0, 2), (2, 2), (4, 1)]
    assert rounds[1].segments == [Segment(3, 12, 2)]
    staged = plan_rounds([7, 8, 3], None, 2)
    assert [r.segments for r in staged] == [[Segment(7, 0, 2)], [Segment(3, 0, 1)]]


def test_split_frames_never_spans_segments():
    frames = split_frames([Segment(0, 5, 3), Segment(9, 0, 1)], 100, 10, 120)
    assert [(f.src, f.dst, f.nbytes) for f in frames] == [
        (0, 50, 120), (120, 170, 120), (240, 290, 60), (900, 0, 100)]


@pytest.mark.parametrize("src_bs,dst_bs", [(16, 32), (16, 8), (8, 24), (16, 16)])
def test_token_runs_cover_every_token_once(src_bs, dst_bs):
    seen = []
    for run in token_runs(5, 100, src_bs, dst_bs):
        assert run.src_off + run.n <= src_bs and run.dst_off + run.n <= dst_bs
        for k in range(run.n):
            seen.append((run.src_block * src_bs + run.src_off + k,
                         run.dst_block * dst_bs + run.dst_off + k))
    assert seen == [(t, t) for t in range(5, 100)]


def test_layout_sizes_and_round_trip():
    assert LAYOUT.token_nbytes == 2 * 2 * 2 * 8 * 4
    assert LAYOUT.block_nbytes == 16 * LAYOUT.token_nbytes
    assert KvLayout.from_dict(LAYOUT.to_dict()) == LAYOUT
    assert KvLayout.from_pool(torch.zeros(3, 2, 2, 16, 2, 8)) == LAYOUT


@pytest.mark.parametrize("field,value,words", [
    ("dtype", "float16", ["KV dtype", "float16", "float32"]),
    ("num_kv_heads", 4, ["KV heads", "4", "2"]),
    ("head_dim", 16, ["head size", "16", "8"]),
    ("num_layers", 3, ["layers", "3", "2"]),
])
def test_incompatible_layout_names_both_values(field, value, words):
    remote = KvLayout(**{**LAYOUT.to_dict(), field: value})
    with pytest.raises(TransferError) as err:
        LAYOUT.check_compatible(remote)
    assert all(w in str(err.value) for w in words)
    assert f"context worker {value}" in str(err.value)
    LAYOUT.check_compatible(KvLayout(**{**LAYOUT.to_dict(), "block_size": 32}))


@pytest.mark.parametrize("handle,words", [
    ("nope", "expected a map"),
    ({"backend": "ZMQ"}, "missing"),
    ({"backend": "FAKE", "endpoint": "e", "transfer_id": "t", "block_ids": [1],
      "num_tokens": 3, "layout": LAYOUT.to_dict()}, "'FAKE' transfer backend"),
    ({"backend": "ZMQ", "endpoint": "e", "transfer_id": "t", "block_ids": [1],
      "num_tokens": 17, "layout": LAYOUT.to_dict()}, "need 2 blocks"),
    ({"backend": "ZMQ", "endpoint": "e", "transfer_id": "t", "block_ids": [1],
      "num_tokens": 3, "layout": {"dtype": "float32"}}, "malformed KV layout"),
])
def test_malformed_handle_is_a_clear_error(handle, words):
    with pytest.raises(TransferError, match=words):
        parse_handle(handle, "ZMQ")


def test_pool_not_in_host_memory_is_refused():
    with pytest.raises(TransferError, match="GPU memory is not supported by the ZMQ"):
        pool_bytes(torch.zeros(3, 2, 2, 16, 2, 8, device="meta"), LAYOUT, "ZMQ")
    with pytest.raises(TransferError, match="does not match the declared layout"):
        pool_bytes(torch.zeros(3, 2, 2, 8, 2, 8), LAYOUT, "ZMQ")


def test_config_defaults_and_normalisation():
    cfg = CacheTransceiverConfig.from_dict({"backend": "zmq"})
    assert cfg.backend == "ZMQ" and cfg.max_tokens_in_buffer is None
    assert cfg.buffer_tokens(48) == 4128 and cfg.buffer_tokens(16) == 4096
    assert cfg.timeout_s == 60.0
    assert CacheTransceiverConfig.from_dict(None) == CacheTransceiverConfig()
    assert CacheTransceiverConfig.from_dict({"kv_transfer_timeout_ms": 500}).timeout_s == 0.5


@pytest.mark.parametrize("d,words", [
    ({"backnd": "ZMQ"}, ["unknown key 'backnd'", "'ZMQ'", "w.yaml"]),
    ({"backend": "TCP"}, ["backend='TCP'", "DEFAULT, NIXL, UCX, MPI, SHM, ZMQ", "w.yaml"]),
    ({"max_tokens_in_buffer": 0}, ["max_tokens_in_buffer=0", "w.yaml"]),
    ({"max_tokens_in_buffer": "4096"}, ["max_tokens_in_buffer='4096'"]),
    ({"kv_transfer_timeout_ms": True}, ["kv_transfer_timeout_ms=True"]),
    ({"kv_transfer_timeout_ms": -5}, ["kv_transfer_timeout_ms=-5"]),
])
def test_config_errors_name_key_value_and_file(d, words):
    with pytest.raises(ConfigError) as err:
        CacheTransceiverConfig.from_dict(d, where="w.yaml")
    assert all(w in str(err.value) for w in words), str(err.value)


def test_config_buffer_must_be_a_multiple_of_the_block_size():
    cfg = CacheTransceiverConfig.from_dict({"max_tokens_in_buffer": 100}, where="w.yaml")
    with pytest.raises(ConfigError, match=r"max_tokens_in_buffer=100.*multiple of .* size 16"):
        cfg.check_block_size(16)
    cfg.check_block_size(20)


def _pretend(monkeypatch, present):
    monkeypatch.setattr(registry, "_found", lambda module: module in present)


def test_default_falls_back_to_zmq_with_a_warning(monkeypatch, caplog):
    _pretend(monkeypatch, {"transfer.zmq_backend", "transfer.fake"})
    with caplog.at_level(logging.WARNING, logger="transfer.registry"):
        assert registry.resolve_backend("DEFAULT") == "ZMQ"
    assert "falling back to the ZMQ" in caplog.text and "nixl" in caplog.text


def test_default_falls_back_when_nixl_is_installed_but_not_built(monkeypatch, caplog):
    _pretend(monkeypatch, {"nixl", "transfer.zmq_backend"})
    with caplog.at_level(logging.WARNING, logger="transfer.registry"):
        assert registry.resolve_backend("default") == "ZMQ"
    assert "not built yet" in caplog.text
    with pytest.raises(BackendUnavailable, match="NIXL transfer backend is not built yet.*ZMQ"):
        registry.resolve_backend("NIXL")


@pytest.mark.parametrize("name,extra", [("NIXL", "nixl"), ("ucx", "ucx"), ("MPI", "mpi")])
def test_missing_backend_names_the_pip_extra(monkeypatch, name, extra):
    _pretend(monkeypatch, set())
    with pytest.raises(BackendUnavailable) as err:
        registry.resolve_backend(name)
    assert f"pip install 'disagg-serve[{extra}]'" in str(err.value)
    assert name.upper() in str(err.value)


def test_zmq_and_fake_resolve_and_unknown_is_refused():
    assert registry.resolve_backend("zmq") == "ZMQ"
    assert registry.resolve_backend("FAKE") == "FAKE"
    with pytest.raises(BackendUnavailable, match="unknown transfer backend 'RDMA'"):
        registry.resolve_backend("RDMA")


def test_create_checks_the_buffer_against_the_block_size():
    cfg = CacheTransceiverConfig(backend="FAKE", max_tokens_in_buffer=24)
    with pytest.raises(ConfigError, match="multiple of the KV block size 16"):
        registry.create_sink(cfg, torch.zeros(4, 2, 2, 16, 2, 8), LAYOUT)


MESSAGES = [m.Hello(1, m.NoInfo()), m.Hello(2, m.UcxInfo(b"addr")), m.Start(3, "t"),
            m.Round(4, "t", [(0, 10, 7), (4096, 1, 2**63 - 1)]), m.Done(5, "t"),
            m.Welcome(6, m.ShmInfo(pid=9, fd=3, nbytes=100, offset=8, host="h")),
            m.Welcome(7, m.NixlInfo(b"md", 2**64 - 1, 5, "VRAM", 1)),
            m.Welcome(8, m.MpiInfo("port", "token")), m.Ack(9), m.Refused(10, "why"),
            m.Chunk(11, 4096)]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda msg: type(msg).__name__)
def test_messages_round_trip_through_their_typed_decoder(msg):
    frames = m.encode(msg)
    assert frames[0] == m.MAGIC
    if isinstance(msg, (m.Hello, m.Start, m.Round, m.Done)):
        assert m.decode_request(frames) == msg
        with pytest.raises(m.Malformed):              # a request is never an answer
            m.decode_answer(frames[1])
    else:
        assert m.decode_answer(frames[1]) == msg
        with pytest.raises(m.Malformed):
            m.decode_request(frames)


def _raw(*fields):
    """A message body built by hand, as a peer that does not follow the types could send it."""
    return m._encoder.encode(list(fields))


@pytest.mark.parametrize("frames,words", [
    ([b"KVX1", _raw("start", 1, "t")], "frames"),
    ([m.MAGIC], "1 frames"),
    ([m.MAGIC, _raw("start", 1, "t"), b"x"], "3 frames"),
    ([m.MAGIC, b"\xc1"], "invalid"),
    ([m.MAGIC, _raw("pull", 1, "t")], "pull"),
    ([m.MAGIC, _raw("start", -1, "t")], ">= 0"),
    ([m.MAGIC, _raw("start", 1, "")], "length >= 1"),
    ([m.MAGIC, _raw("start", 1, "x" * 1025)], "length <= 1024"),
    ([m.MAGIC, _raw("start", 1, 7)], "Expected `str`"),
    ([m.MAGIC, _raw("start", 1)], "at least length 3"),
    ([m.MAGIC, _raw("round", 1, "t", [[0, 0, 1]])], ">= 1"),
    ([m.MAGIC, _raw("round", 1, "t", [[-8, 1, 1]])], ">= 0"),
    ([m.MAGIC, _raw("round", 1, "t", [[0, 2**41, 1]])], "<= 1099511627776"),
    ([m.MAGIC, _raw("round", 1, "t", [[0, 1]])], "length 3"),
    ([m.MAGIC, _raw("round", 1, "t", [[0, 1, 1]] * (m.MAX_FRAMES + 1))], "length <= 65536"),
    ([m.MAGIC, _raw("round", 1, "t", [[[0], 1, 1]])], "Expected `int`"),
    ([m.MAGIC, _raw("hello", 1, {"address": b"x"})], "Expected `array`"),
    ([m.MAGIC, _raw("hello", 1, ["ucx", b"x" * (m.MAX_BLOB_BYTES + 1)])], "length <= 1048576"),
    ([m.MAGIC, _raw("hello", 1, ["pickle", b"x"])], "pickle"),
    ([m.MAGIC, b"\x00" * (m.MAX_MESSAGE_BYTES + 1)], "at most"),
])
def test_a_request_out_of_type_or_range_is_malformed(frames, words):
    with pytest.raises(m.Malformed, match=words.replace("`", ".").replace("[", ".")):
        m.decode_request(frames)


@pytest.mark.parametrize("body,words", [
    (_raw("chunk", 1, 0), ">= 1"),
    (_raw("refused", 1, "x" * (m.MAX_ERROR_CHARS + 1)), "length <= 4096"),
    (_raw("welcome", 1, ["shm", 0, 3, 1, 0, "h"]), ">= 1"),
    (_raw("welcome", 1, ["nixl", b"", 0, 1, "HBM", 0]), "Invalid enum value .HBM."),
    (_raw("ack", "1"), "Expected `int`"),
])
def test_an_answer_out_of_type_or_range_is_malformed(body, words):
    with pytest.raises(m.Malformed, match=words.replace("`", ".")):
        m.decode_answer(body)


def _at_page_offset(buf: np.ndarray, offset: int, n: int) -> np.ndarray:
    start = (offset - buf.ctypes.data) % shm.PAGE
    return buf[start:start + n]


@pytest.mark.parametrize("delta,n,pieces", [
    (0, 2 * shm.PIECE + 123, 1),           # no aliasing: one memcpy
    (64, 2 * shm.PIECE + 123, 3),          # aliasing band: pieces, the last one short
    (shm.ALIAS_BAND - 1, 2 * shm.PIECE, 2),
    (shm.ALIAS_BAND, 2 * shm.PIECE, 1),
    (shm.PAGE - 64, 2 * shm.PIECE, 1),     # destination before the source: no aliasing
    (64, shm.PIECE, 1),                    # small enough for one piece anyway
])
def test_shm_copy_run_is_exact_and_splits_only_an_aliased_large_run(monkeypatch, delta, n,
                                                                     pieces):
    rng = np.random.default_rng(delta)
    src_buf = rng.integers(0, 256, n + 2 * shm.PAGE, dtype=np.uint8)
    dst_buf = np.zeros(n + 2 * shm.PAGE, dtype=np.uint8)
    src = _at_page_offset(src_buf, 0, n)
    dst = _at_page_offset(dst_buf, delta, n)
    calls = []
    copyto = np.copyto
    monkeypatch.setattr(shm.np, "copyto", lambda d, s: calls.append(len(s)) or copyto(d, s))
    shm.copy_run(dst, src)
    assert np.array_equal(dst, src)
    assert np.count_nonzero(dst_buf) == np.count_nonzero(dst)     # nothing written outside
    assert len(calls) == pieces and sum(calls) == n


def test_shm_sink_moves_its_pool_to_a_page_and_every_view_follows():
    pool = torch.arange(3 * 4096 + 16, dtype=torch.float32)[:3 * 4096]     # a view, as in a sink
    before = pool.view(3, -1)                   # a view taken before the move
    plane = shm.ShmSinkPlane(pool)
    assert pool.untyped_storage().is_shared() and pool.data_ptr() % shm.PAGE == 0
    pool[5] = -1.0
    assert before[0, 5].item() == -1.0 and before[2, -1].item() == 3 * 4096 - 1
    staged = plane.staging(1000)
    assert staged.data_ptr() % shm.PAGE == 0 and staged.numel() == 1000
