"""The wire protocol: every message survives encode/decode, and decode rejects what is not a valid
message of this version with ProtocolError (the decode fast path included)."""
from __future__ import annotations

import sys

import msgpack
import msgspec
import pytest

from broker import protocol as p


def frames(cmd: int, body, version: bytes = p.VERSION) -> list:
    return [version + bytes([cmd]) + msgpack.packb(body, use_bin_type=True)]


def submit_body(**over) -> dict:
    body = p.Submit("r1", token_ids=[1, 2, 3], sampling={"max_tokens": 4}).body()
    body.update(over)
    return body


SAMPLES = [
    p.Submit("r1", prompt="hello", sampling={"max_tokens": 3, "stop": ["x"]}, timeout_ms=500),
    p.Submit("r2", token_ids=[1, 2, 3]),
    p.Submit("r3", messages=[{"role": "user", "content": "hi"}]),
    p.Cancel("r1"), p.Ping(7, metrics=True), p.Accepted("r1"),
    p.Tokens("r1", 0, [5, 6], "ab", attempt=2),
    p.Final("r1", p.Finish.LENGTH, {"prompt_tokens": 3, "completion_tokens": 2}, {"total": 0.5, "ttft": None}),
    p.Error("r1", p.Code.TIMEOUT, "late", True), p.Pong(1, {"requests": 0}),
    p.Ready("w", "context", "m", 4, 100, {"backend": "ZMQ"}, 123, 500),
    p.Heartbeat(2, 3, 4),
    p.ContextDone("r1", 1, 9, "x", [1, 2, 3], {"k": 1}, None, 0.25),
    p.ContextDone("r1", 1, 9, "x", [1, 2, 3], finish_reason=p.Finish.STOP),
    p.KvPulled("r1", 2, 0.001, 4096), p.Finished("r1", 2, p.Finish.LENGTH, 3, 0.1),
    p.Finished("r1", 2, p.Finish.STOP, 3, 0.1, 4, [7], "z"),
    p.Final("r1", p.Finish.STOP, {}, {}, 4, [7], "z"),
    p.Failed("r1", 2, p.Code.KV_TRANSFER_FAILED, "gone", True), p.Disconnect("bye"),
    p.Prefill("r1", 1, token_ids=[1, 2], sampling={"max_tokens": 2}, lease_ms=1000),
    p.Decode("r1", 2, [1, 2], 9, "x", {"k": 1}, {"max_tokens": 2}),
    p.Generate("r1", 1, prompt="hi"), p.KvRelease("r1", 1), p.CancelWork("r1", 2),
    p.BrokerHeartbeat(), p.Reconnect("unknown"),
    p.Heartbeat(2, 3, 4, draining=True), p.Drain("operator"), p.DrainWorker("ctx-1", 9),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_roundtrip(msg):
    back = p.decode(msg.encode())
    assert back == msg and type(back) is type(msg)
    # the decoded message is a normal frozen struct, and body() is its map on the wire
    assert msgspec.structs.asdict(back) == msgspec.structs.asdict(msg)
    assert msgpack.unpackb(back.encode()[0][p.HEADER_LEN:]) == msg.body()
    with pytest.raises(AttributeError):
        back.request_id = "other"   # type: ignore[misc]


def test_defaults_filled_and_unknown_keys_ignored():
    msg = p.decode(frames(p.Tokens.CMD, {"request_id": "r", "index": 0, "token_ids": [1], "future": 1}))
    assert msg == p.Tokens("r", 0, [1]) and not hasattr(msg, "future")
    fin = p.decode(frames(p.Final.CMD, {"request_id": "r", "finish_reason": "stop"}))
    assert fin.usage == {} and fin.timings == {}
    other = p.decode(frames(p.Final.CMD, {"request_id": "r", "finish_reason": "stop"}))
    assert other.usage is not fin.usage     # default_factory: a fresh dict each time
    assert p.decode(frames(p.Final.CMD, {"request_id": "r", "finish_reason": "stop", "x": [1]})).encode() \
        == p.Final("r", "stop").encode()


def test_float_field_takes_an_int():
    assert p.decode(frames(p.KvPulled.CMD, {"request_id": "r", "attempt": 1, "kv_transfer_s": 2})).kv_transfer_s == 2


def test_frames_may_be_zmq_frames():
    import zmq
    msg = p.Tokens("r1", 0, [5], "a")
    assert p.decode([zmq.Frame(f) for f in msg.encode()]) == msg


@pytest.mark.parametrize("bad, what", [
    (frames(p.Tokens.CMD, {"request_id": "r"}, version=b"DSRV0"), "wrong protocol version"),
    (frames(99, {"request_id": "r"}), "unknown command"),
    ([p.VERSION], "no command byte"),
    ([], "empty message"),
    ([p.header(p.Tokens.CMD) + b"\xc1"], "undecodable"),
    (frames(p.Tokens.CMD, [1, 2]), "not a map"),
    (frames(p.Tokens.CMD, {"request_id": "r", "index": 0}), "missing field 'token_ids'"),
    (frames(p.Tokens.CMD, {"request_id": "r", "index": "0", "token_ids": [1]}), "Tokens.index"),
    (frames(p.Tokens.CMD, {"request_id": 5, "index": 0, "token_ids": [1]}), "Tokens.request_id"),
    (frames(p.KvRelease.CMD, {"request_id": "r", "attempt": True}), "KvRelease.attempt"),   # bools are not ints
    (frames(p.KvPulled.CMD, {"request_id": "r", "attempt": 1, "kv_transfer_s": False}), "kv_transfer_s"),
    (frames(p.Tokens.CMD, {"request_id": "r", "index": 0, "token_ids": 7}), "Tokens.token_ids"),
    (frames(p.Final.CMD, {"request_id": "r", "finish_reason": "stop", "usage": []}), "Final.usage"),
    (frames(p.Error.CMD, {"request_id": "r", "code": "X", "message": "m", "retryable": 1}), "Error.retryable"),
])
def test_invalid_messages_raise_protocol_error(bad, what):
    with pytest.raises(p.ProtocolError, match=what):
        p.decode(bad)


@pytest.mark.parametrize("ids", [[1, "2", 3], [1, 2.0], [1, None], [True, 2], [[1], 2]])
def test_token_id_lists_with_a_non_int_are_rejected(ids):
    with pytest.raises(p.ProtocolError, match="token_ids"):
        p.decode(frames(p.Tokens.CMD, {"request_id": "r", "index": 0, "token_ids": ids}))
    with pytest.raises(p.ProtocolError, match="token_ids"):
        p.decode(frames(p.Submit.CMD, submit_body(token_ids=ids)))
    with pytest.raises(p.ProtocolError, match="prompt_token_ids"):
        p.decode(frames(p.ContextDone.CMD, {**p.ContextDone("r", 1, 9, "x", [1]).body(), "prompt_token_ids": ids}))


def test_nested_lists_are_checked_per_element():
    with pytest.raises(p.ProtocolError, match="messages"):
        p.decode(frames(p.Submit.CMD, submit_body(token_ids=None, messages=["not a map"])))


@pytest.mark.parametrize("over, what", [
    ({"request_id": ""}, "request_id"),
    ({"prompt": "x"}, "exactly one of"),
    ({"token_ids": b""}, "at least one token"),
    ({"timeout_ms": 0}, "timeout_ms"),
    ({"sampling": {"max_tokens": 0}}, "max_tokens"),
    ({"sampling": {"temperature": True}}, "temperature"),
    ({"sampling": {"nope": 1}}, "unknown sampling parameter 'nope'"),
])
def test_submit_validation_runs_on_decode(over, what):
    with pytest.raises(p.ProtocolError, match=what):
        p.decode(frames(p.Submit.CMD, submit_body(**over)))


# ---------------------------------------------------------------------------------------------
# batches: several messages for one peer in one ZeroMQ message

def test_batch_roundtrip_keeps_every_message_in_order():
    frames_ = p.encode_many(SAMPLES)
    assert len(frames_) == 1 and frames_[0].startswith(p.header(p.BATCH))
    assert p.decode_all(frames_) == SAMPLES
    # one message goes as itself, and decode_all reads a plain message too
    assert p.encode_many([SAMPLES[0]]) == SAMPLES[0].encode()
    assert p.decode_all(SAMPLES[0].encode()) == [SAMPLES[0]]
    with pytest.raises(ValueError):
        p.encode_many([])


def test_a_bad_message_in_a_batch_fails_alone_and_names_its_request():
    items = [[p.Accepted.CMD, {"request_id": "ok-1"}],
             [p.Submit.CMD, submit_body(request_id="bad-1", sampling={"top_p": 7})],
             [p.Tokens.CMD, {"request_id": "bad-2", "index": "zero", "token_ids": [1]}],
             [99, {"request_id": "bad-3"}],
             "not a pair",
             [p.Accepted.CMD, {"request_id": "ok-2"}]]
    out = p.decode_all([p.header(p.BATCH) + msgpack.packb(items)])
    assert out[0] == p.Accepted("ok-1") and out[5] == p.Accepted("ok-2")
    errors = out[1:5]
    assert all(isinstance(e, p.ProtocolError) for e in errors)
    assert [e.request_id for e in errors] == ["bad-1", "bad-2", "bad-3", ""]
    assert "top_p" in str(errors[0]) and "7" in str(errors[0])
    assert "unknown command 99" in str(errors[2]) and "not a [command, map] pair" in str(errors[3])


@pytest.mark.parametrize("bad, what", [
    ([b"DSRV0" + bytes([p.BATCH]) + msgpack.packb([])], "wrong protocol version"),
    ([p.header(p.BATCH) + b"\xc1"], "undecodable batch"),
    ([p.header(p.BATCH) + msgpack.packb({"a": 1})], "not an array"),
    ([p.header(p.BATCH) + msgpack.packb([]), b"raw"], "a batch is one frame"),
])
def test_a_bad_batch_envelope_raises(bad, what):
    with pytest.raises(p.ProtocolError, match=what):
        p.decode_all(bad)


def test_sampling_validation_cache_keeps_exact_types():
    # a map seen valid is not checked again, but 1 == True and 2.0 == 2 must not pass for it
    p.check_sampling({"max_tokens": 2, "ignore_eos": True})
    p.check_sampling({"max_tokens": 2, "ignore_eos": True})
    with pytest.raises(p.ProtocolError, match="ignore_eos"):
        p.check_sampling({"max_tokens": 2, "ignore_eos": 1})
    with pytest.raises(p.ProtocolError, match="max_tokens"):
        p.check_sampling({"max_tokens": 2.0, "ignore_eos": True})
    p.check_sampling({"stop": ["x"]})          # unhashable: checked every time, still valid
    with pytest.raises(p.ProtocolError, match="stop"):
        p.check_sampling({"stop": [1]})


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.1", True, float("nan")])
def test_min_p_is_a_number_in_0_1_and_errors_name_it(bad):
    assert p.SamplingParams.from_dict({"min_p": 0.05}).min_p == 0.05
    assert p.SamplingParams.from_dict({"min_p": 0}).to_dict()["min_p"] == 0
    with pytest.raises(p.ProtocolError, match=f"min_p={bad!r}"):
        p.SamplingParams.from_dict({"min_p": bad})


def test_constructor_contract():
    # positional and keyword arguments, defaults, fresh default factories, __post_init__
    # validation and frozenness
    a, b = p.Final("r", "stop"), p.Final(request_id="r", finish_reason="stop")
    assert a == b and a.usage == {} and a.usage is not b.usage
    with pytest.raises(TypeError):
        p.Tokens("r")                              # a required field missing
    with pytest.raises(p.ProtocolError, match="exactly one of"):
        p.Submit("r")                              # __post_init__ runs
    with pytest.raises(AttributeError):
        a.finish_reason = "length"                 # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# packed token ids, and bounded inputs

def test_prompt_token_ids_travel_packed_and_read_as_ints():
    ids = [0, 1, 255, 256, 2**32 - 1] + list(range(1000))
    msg = p.Prefill("r", 1, token_ids=ids)
    wire = msgpack.unpackb(msg.encode()[0][p.HEADER_LEN:])["token_ids"]
    assert type(wire) is bytes and wire[:8] == b"\x00\x00\x00\x00\x01\x00\x00\x00" and len(wire) == 4 * len(ids)
    back = p.decode(msg.encode()).token_ids
    assert type(back) is p.TokenIds and list(back) == ids and len(back) == len(ids)
    assert back == ids and back == p.TokenIds(ids) and back != ids[:-1] and back != p.TokenIds(ids[:-1])
    assert (back[0], back[4], back[-1], back[2:4]) == (0, 2**32 - 1, 999, [255, 256])
    assert "... 1005 ids" in repr(back)
    # what the worker passes (a list) and what the broker passes on (the decoded TokenIds) alike
    assert p.Decode("r", 2, back, 9, "x", {}).prompt_token_ids is back
    assert p.ContextDone("r", 1, 9, "x", ids).prompt_token_ids == back


@pytest.mark.parametrize("ids, what", [([-1], "token_ids"), ([2**32], "token_ids"), ([1.5], "token_ids"),
                                       ("abc", "token_ids")])
def test_token_ids_out_of_uint32_are_refused_when_built(ids, what):
    with pytest.raises(p.ProtocolError, match=what):
        p.Submit("r", token_ids=ids)


@pytest.mark.parametrize("value, what", [
    (b"\x01\x00\x00", "multiple of 4"),                    # not a whole number of ids
    ([1, 2, 3], "expected packed token ids"),               # ids as an array: the old wire form
    (b"\x00" * (4 * p.MAX_TOKEN_IDS + 4), "at most"),
])
def test_bad_packed_token_ids_raise_naming_the_field(value, what):
    with pytest.raises(p.ProtocolError, match=what) as e:
        p.decode(frames(p.Submit.CMD, submit_body(token_ids=value)))
    assert "Submit.token_ids" in str(e.value) and e.value.request_id == "r1"
    with pytest.raises(p.ProtocolError, match="Decode.prompt_token_ids"):
        p.decode(frames(p.Decode.CMD, {**p.Decode("r", 2, [1], 9, "x", {}).body(), "prompt_token_ids": value}))


NESTED = b"\x91" * 100_000 + b"\xc0"     # an array in an array ... 100,000 deep


@pytest.mark.parametrize("field_", ["sampling", "token_ids", "messages", "request_id"])
def test_deep_nesting_in_a_field_is_a_protocol_error(field_):
    body = msgpack.packb({"request_id": "deep"})[1:]   # the map's one entry, without its header
    key = msgpack.packb(field_)
    data = p.header(p.Submit.CMD) + b"\x82" + body + key + NESTED
    with pytest.raises(p.ProtocolError):
        p.decode([data])
    with pytest.raises(p.ProtocolError):
        p.decode_all([p.header(p.BATCH) + b"\x91\x92\x01" + b"\x82" + body + key + NESTED])


@pytest.mark.parametrize("body", [NESTED, b"\x92\xa1x" + NESTED, b"\x92\xa1x\xc1"])
def test_a_deep_or_broken_batch_after_a_bad_item_is_a_protocol_error(body):
    with pytest.raises(p.ProtocolError, match="undecodable batch"):
        p.decode_all([p.header(p.BATCH) + body])


def test_a_message_is_one_frame():
    with pytest.raises(p.ProtocolError, match="a message is one frame, got 2"):
        p.decode(p.Accepted("r").encode() + [b"raw"])


def test_truncated_or_corrupted_frames_raise_only_protocol_error():
    import random
    rng = random.Random(7)
    whole = p.encode_many(SAMPLES)[0]
    for data in [whole, *(m.encode()[0] for m in SAMPLES)]:
        cases = [data[:n] for n in range(len(data))]
        for _ in range(200):
            b = bytearray(data)
            b[rng.randrange(p.HEADER_LEN - 1, len(b))] = rng.randrange(256)
            cases.append(bytes(b))
        for case in cases:
            try:
                out = p.decode_all([case])
            except p.ProtocolError:
                continue
            assert all(isinstance(m, (p.Message, p.ProtocolError)) for m in out)


# ---------------------------------------------------------------------------------------------
# bounded decoding (issue 13): depth, sizes, ranges; the request named even when undecodable

def _with_field(cmd: int, body: dict, key: str, raw_value: bytes) -> list:
    """One message whose ``key`` holds ``raw_value`` (raw msgpack bytes), after ``body``."""
    packed = msgpack.packb(body)
    assert 0x80 <= packed[0] < 0x8f
    return [p.header(cmd) + bytes([packed[0] + 1]) + packed[1:] + msgpack.packb(key) + raw_value]


def _deep(levels: int) -> bytes:
    return b"\x91" * levels + b"\xc0"


@pytest.fixture
def python_recursion_limit():
    """Python's default recursion limit, the broker's (it never imports torch): msgspec skips an
    unknown key's value up to that depth, and torch.compile, run by an earlier test in this
    process, raises the limit to 2000."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(old)


@pytest.mark.parametrize("levels", [p.MAX_DEPTH + 1, 990, 1000, 5000])
@pytest.mark.parametrize("where", ["sampling", "messages", "unknown_key", "batch"])
def test_nesting_past_the_bound_is_refused_naming_the_request(levels, where, python_recursion_limit):
    base = {"request_id": "deep-1", "prompt": "hi"}
    if where == "sampling":
        msg = _with_field(p.Submit.CMD, base, "sampling", b"\x81\xa4stop" + _deep(levels))
    elif where == "messages":
        msg = _with_field(p.Submit.CMD, {"request_id": "deep-1"}, "messages",
                          b"\x91\x83\xa4role\xa4user\xa7content\xa2hi\xa5extra" + _deep(levels))
    else:
        msg = _with_field(p.Submit.CMD, base, "zz_unknown", _deep(levels))
        if levels < 100:       # an unknown key is skipped, never kept: shallow, it does no harm
            assert p.decode(msg).request_id == "deep-1"
            return
    if where == "batch":
        frames_ = [p.header(p.BATCH) + b"\x92\x92\x03\x80\x92\x01" + msg[0][p.HEADER_LEN:]]
        ping, err = p.decode_all(frames_)
        assert ping == p.Ping()
    else:
        with pytest.raises(p.ProtocolError) as e:
            p.decode(msg)
        err = e.value
    assert isinstance(err, p.ProtocolError) and err.request_id == "deep-1", err
    assert len(str(err)) < 1000


@pytest.mark.parametrize("cls, body, key", [
    (p.Ready, {"worker_id": "w", "role": "context", "model": "m", "slots": 1, "kv_blocks": 1}, "transfer"),
    (p.ContextDone, {"request_id": "deep-2", "attempt": 1, "first_token": 1, "first_text": "x",
                     "prompt_token_ids": b"\x01\x00\x00\x00"}, "kv_handle"),
])
def test_worker_messages_bound_nesting_too(cls, body, key):
    ok = p.decode(_with_field(cls.CMD, body, key, b"\x81\xa1k" + _deep(p.MAX_DEPTH - 2)))
    assert isinstance(ok, cls)
    with pytest.raises(p.ProtocolError, match=f"{cls.__name__}.{key}") as e:
        p.decode(_with_field(cls.CMD, body, key, b"\x81\xa1k" + _deep(p.MAX_DEPTH)))
    assert e.value.request_id == body.get("request_id", "")


READY = {"worker_id": "w", "role": "context", "model": "m", "slots": 4, "kv_blocks": 100, "heartbeat_ms": 500}


@pytest.mark.parametrize("over, what", [
    ({"slots": 0}, "slots"), ({"slots": 2**40}, "slots"), ({"slots": -1}, "slots"),
    ({"kv_blocks": 2**40}, "kv_blocks"), ({"heartbeat_ms": 3_600_000}, "heartbeat_ms"),
    ({"heartbeat_ms": 0}, "heartbeat_ms"), ({"role": "junk-role-1"}, "role"),
    ({"worker_id": ""}, "worker_id"), ({"worker_id": "w" * 10_000}, "worker_id"),
    ({"pid": -5}, "pid"),
])
def test_ready_values_are_range_checked(over, what):
    assert p.decode(frames(p.Ready.CMD, READY)).slots == 4
    with pytest.raises(p.ProtocolError, match=f"Ready.{what}"):
        p.decode(frames(p.Ready.CMD, {**READY, **over}))


@pytest.mark.parametrize("cls, body, what", [
    (p.Heartbeat, {"free_blocks": -1}, "free_blocks"),
    (p.Tokens, {"request_id": "r", "index": -1, "token_ids": [1]}, "index"),
    (p.Tokens, {"request_id": "r", "index": 0, "token_ids": [2**40]}, "token_ids"),
    (p.Failed, {"request_id": "r", "attempt": 1, "code": "X" * 100, "message": "m"}, "code"),
    (p.Submit, {"request_id": "r" * 300, "prompt": "x"}, "request_id"),
    (p.Submit, {"request_id": "r", "prompt": "x", "timeout_ms": -1}, "timeout_ms"),
    (p.Submit, {"request_id": "r", "prompt": "x", "sampling": {str(i): 1 for i in range(p.MAX_KEYS + 1)}},
     "sampling"),
])
def test_integers_strings_and_maps_are_bounded(cls, body, what):
    with pytest.raises(p.ProtocolError, match=what):
        p.decode(frames(cls.CMD, body))


def test_errors_show_a_bounded_value_not_the_whole_input():
    huge = {"request_id": "r", "prompt": "x", "sampling": {"stop": ["y" * 1_000_000, 5]}}
    with pytest.raises(p.ProtocolError) as e:
        p.decode(frames(p.Submit.CMD, huge))
    assert "stop" in str(e.value) and len(str(e.value)) < 1000


@pytest.mark.parametrize("body, rid", [
    ({"request_id": "a-1"}, "a-1"),
    ({"x": [[1, {"y": b"\x00" * 300}], "s" * 70000], "request_id": "b-2"}, "b-2"),
    ({"request_id": 5}, ""), ([1, 2], ""), ({"x": 1}, ""),
])
def test_request_id_of_reads_the_id_without_decoding_the_rest(body, rid):
    data = msgpack.packb(body, use_bin_type=True)
    assert p.request_id_of(data) == rid
    assert p.request_id_of(data + _deep(100_000)) == rid     # trailing junk is never reached
    assert p.request_id_of(data[:len(data) // 2]) in (rid, "")   # truncated: never raises


def test_request_id_of_reads_past_a_deep_value_iteratively():
    data = b"\x82\xa1x" + _deep(5000) + msgpack.packb("request_id") + msgpack.packb("c-3")
    assert p.request_id_of(data) == "c-3"
    assert p.request_id_of(data, budget=1000) == ""


def test_malformed_messages_leave_no_reference_cycles():
    import gc
    bad = [frames(p.Submit.CMD, submit_body(sampling={"top_p": 7})),
           frames(p.Tokens.CMD, {"request_id": "r", "index": "x", "token_ids": [1]}),
           _with_field(p.Submit.CMD, {"request_id": "d"}, "sampling", _deep(2000)),
           [p.header(p.BATCH) + msgpack.packb([[p.Submit.CMD, submit_body(request_id="b", sampling=[1])],
                                              [p.Accepted.CMD, {"request_id": 3}], [99, {}], "x"])]]
    gc.collect()
    gc.disable()
    try:
        for _ in range(50):
            for f in bad:
                try:
                    p.decode_all(f)
                except p.ProtocolError:
                    pass
        assert gc.collect() == 0, "decoding junk left garbage only the cycle collector can free"
    finally:
        gc.enable()


def test_the_configs_bounds_are_the_protocols():
    from broker import config
    assert config.BrokerConfig().max_message_bytes == p.MAX_MESSAGE_BYTES
    assert (config.MAX_SLOTS, config.MIN_HEARTBEAT_MS, config.MAX_HEARTBEAT_MS) == \
        (p.MAX_SLOTS, p.MIN_HEARTBEAT_MS, p.MAX_HEARTBEAT_MS)
