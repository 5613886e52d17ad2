"""Authentication (issue 13, finding 5): CURVE on the broker's two sockets and on the KV channel,
ZAP admission of listed keys only, the HTTP API key, request ids scoped per client, and the
transfer endpoints listening on the advertised interface only. The rogue-worker cases run with
CURVE on: a process without an admitted key gets nothing (no prompts, no tokens)."""
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
import zmq
from click.testing import CliRunner

from broker import protocol as p
from broker.auth import (PEERS, CurveClient, CurveServer, KeyPair, api_key_from,
                         bearer_ok, broker_curve, curve_client, is_loopback, keygen, load_public_dir)
from broker.cli import cli as broker_cli
from broker.config import BrokerConfig, ConfigError, parse_disagg_config
from broker.state import BACK, FRONT, BrokerState
from client import BrokerUnavailable, Client
from tests.harness import ROOT, Deployment, _env

API_KEY = "sk-test-0123456789abcdef"


# ---------------------------------------------------------------------------------------------
# keys

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The broker's pair; admitted clients (alice) and workers (ctx, gen); unlisted pairs."""
    root = tmp_path_factory.mktemp("keys")
    d = {name: str(root / sub) for name, sub in (("clients", "clients"), ("workers", "workers"),
                                                 ("private", "private"))}
    for sub, names in (("clients", ["alice"]), ("workers", ["ctx", "gen"]), ("private", ["broker", "mallory"])):
        for n in names:
            keygen(d[sub], n)
    pair = lambda sub, n: os.path.join(d[sub], f"{n}.key_secret")   # noqa: E731
    d.update(broker=pair("private", "broker"), broker_public=os.path.join(d["private"], "broker.key"),
             alice=pair("clients", "alice"), ctx=pair("workers", "ctx"), gen=pair("workers", "gen"),
             mallory=pair("private", "mallory"))
    return d


def as_client(keys, name):
    return CurveClient.load(keys[name], keys["broker_public"])


def test_keygen_writes_a_loadable_pair_and_refuses_to_overwrite(tmp_path):
    res = CliRunner().invoke(broker_cli, ["keygen", "--dir", str(tmp_path), "--name", "w1"])
    assert res.exit_code == 0, res.output
    pair = KeyPair.load(str(tmp_path / "w1.key_secret"))
    assert zmq.curve_public(pair.secret) == pair.public
    assert load_public_dir(str(tmp_path)) == {pair.public}
    assert oct(os.stat(tmp_path / "w1.key_secret").st_mode & 0o777) == "0o600"
    assert oct(os.stat(tmp_path / "w1.key").st_mode & 0o777) == "0o644"
    again = CliRunner().invoke(broker_cli, ["keygen", "--dir", str(tmp_path), "--name", "w1"])
    assert again.exit_code == 2 and "w1.key_secret" in again.output and "--force" in again.output


def test_key_errors_name_the_file_and_value(tmp_path, keys):
    with pytest.raises(ConfigError, match=r"--curve-key='/nope/x.key_secret': no such key file"):
        KeyPair.load("/nope/x.key_secret", "--curve-key")
    with pytest.raises(ConfigError, match=r"broker.key'.*holds no secret-key"):
        KeyPair.load(keys["broker_public"])
    bad = tmp_path / "bad.key_secret"
    bad.write_text('curve\n    public-key = "tooshort"\n    secret-key = "x"\n')
    with pytest.raises(ConfigError, match=r"bad.key_secret'.*public-key=b'tooshort': not a CURVE key"):
        KeyPair.load(str(bad))
    mixed = tmp_path / "mixed.key_secret"
    a, b = KeyPair.load(keys["alice"]), KeyPair.load(keys["mallory"])
    mixed.write_text(f'curve\n    public-key = "{a.public.decode()}"\n    secret-key = "{b.secret.decode()}"\n')
    with pytest.raises(ConfigError, match="does not belong"):
        KeyPair.load(str(mixed))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"auth.client_keys='.*empty': holds no NAME.key"):
        load_public_dir(str(tmp_path / "empty"), "auth.client_keys")
    with pytest.raises(ConfigError, match="--curve-key is set but --curve-server-key is not"):
        curve_client(keys["alice"], None)
    with pytest.raises(ConfigError, match=r"auth.curve_key=.*, auth.client_keys=.* set but auth.worker_keys not"):
        broker_curve(keys["broker"], keys["clients"], None)
    with pytest.raises(ConfigError, match=r"--client-keys='c' set but --curve-key, --worker-keys not"):
        broker_curve(None, "c", None, ("--curve-key", "--client-keys", "--worker-keys"))
    assert broker_curve(None, None, None) is None


def test_config_auth_section_resolves_paths_and_checks_its_keys(tmp_path, keys):
    cfg = tmp_path / "disagg.yaml"
    cfg.write_text("auth:\n  curve_key: k/broker.key_secret\n  client_keys: c\n  worker_keys: /abs/w\n"
                   "  api_key: sk-0123456789\n")
    a = parse_disagg_config({"auth": {"curve_key": "k/b.key_secret", "client_keys": "c", "worker_keys": "/w"}},
                            source=str(cfg)).auth
    assert a.curve_key == str(tmp_path / "k/b.key_secret") and a.client_keys == str(tmp_path / "c")
    assert a.worker_keys == "/w" and not a.metrics_need_key
    with pytest.raises(ConfigError, match=r"unknown key 'auth.api_keys'.*did you mean 'api_key'"):
        parse_disagg_config({"auth": {"api_keys": "x"}}, source="d.yaml")


def test_api_key_comes_from_flag_config_or_environment(monkeypatch):
    monkeypatch.delenv("DSRV_API_KEY", raising=False)
    assert api_key_from(None, None) is None
    monkeypatch.setenv("DSRV_API_KEY", "sk-from-env-123")
    assert api_key_from(None, None) == "sk-from-env-123"
    assert api_key_from(None, "sk-from-config") == "sk-from-config"
    assert api_key_from("sk-from-flag-1", "sk-from-config") == "sk-from-flag-1"
    with pytest.raises(ConfigError, match="of 3 characters: expected at least 8"):
        api_key_from("abc", None)
    assert bearer_ok(f"Bearer {API_KEY}", API_KEY)
    assert not bearer_ok(API_KEY, API_KEY) and not bearer_ok("Bearer sk-other", API_KEY)
    assert not bearer_ok(None, API_KEY) and not bearer_ok(f"Basic {API_KEY}", API_KEY)


def test_a_socket_beyond_loopback_without_keys_warns_once(caplog, monkeypatch):
    from broker import auth
    from broker.server import BrokerServer
    assert is_loopback("tcp://127.0.0.1:5") and is_loopback("tcp://[::1]:5") and is_loopback("localhost")
    assert not is_loopback("tcp://0.0.0.0:5") and not is_loopback("tcp://*:5") and not is_loopback("10.0.0.1")
    monkeypatch.setattr(auth, "_warned_once", [])
    ctx = zmq.Context()
    servers = []
    try:
        servers.append(BrokerServer("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", ctx=ctx))
        assert not [r for r in caplog.records if "beyond loopback" in r.getMessage()]
        for _ in range(2):
            servers.append(BrokerServer("tcp://0.0.0.0:0", "tcp://127.0.0.1:0", ctx=ctx))
        [warned] = [r.getMessage() for r in caplog.records if "beyond loopback" in r.getMessage()]
        assert "tcp://0.0.0.0:" in warned and "without CURVE authentication" in warned
    finally:
        for server in servers:
            server.close()
        ctx.term()


# ---------------------------------------------------------------------------------------------
# request ids scoped per client (the state machine, no sockets)

A, B = b"client-a", b"client-b"


def of(out, cls, socket=None, ident=None):
    return [o.msg for o in out if isinstance(o.msg, cls) and (socket is None or o.socket == socket)
            and (ident is None or o.identity == ident)]


def test_a_client_can_neither_cancel_nor_detect_another_clients_request_id():
    st = BrokerState(BrokerConfig(), clock=lambda: 1000.0)
    st.on_worker(b"w", p.Ready("w", "both", "tiny", 8, 100, {}, 1, 1000))
    [gen_a] = of(st.on_client(A, p.Submit("r1", prompt="hi")), p.Generate)
    out = st.on_client(B, p.Submit("r1", prompt="hi"))          # the same id, another client
    assert of(out, p.Accepted, FRONT, B)[0].request_id == "r1" and not of(out, p.Error)
    [gen_b] = of(out, p.Generate)
    assert gen_b.request_id != gen_a.request_id                  # the workers see two requests
    dup = st.on_client(B, p.Submit("r1", prompt="hi"))           # a duplicate of its own: refused
    assert of(dup, p.Error)[0].code == p.Code.DUPLICATE_REQUEST
    assert of(st.on_client(B, p.Cancel("a-only")), p.Final) == []   # not B's: nothing happens
    [a_only] = of(st.on_client(A, p.Submit("a-only", prompt="hi")), p.Generate)
    assert st.on_client(B, p.Cancel("a-only")) == [] and a_only.request_id in st.requests
    out = st.on_client(B, p.Cancel("r1"))                        # B cancels its own r1 only
    [fin] = of(out, p.Final, FRONT, B)
    assert fin.request_id == "r1" and fin.finish_reason == p.Finish.CANCELLED
    assert of(out, p.CancelWork, BACK)[0].request_id == gen_b.request_id
    assert gen_a.request_id in st.requests                       # A's r1 runs on
    out = st.on_worker(b"w", p.Tokens(gen_a.request_id, 0, [5], "x", gen_a.attempt))
    assert [(o.identity, o.msg.request_id) for o in out if o.socket == FRONT] == [(A, "r1")]
    out = st.on_worker(b"w", p.Finished(gen_a.request_id, gen_a.attempt, "length"))
    assert [(o.identity, o.msg.request_id) for o in out if isinstance(o.msg, p.Final)] == [(A, "r1")]
    st.on_client(A, p.Cancel("a-only"))
    assert st.requests == {} and len(st.ids) == 0


def test_a_rekeyed_request_ends_with_the_clients_own_id():
    st = BrokerState(BrokerConfig(), clock=lambda: 1000.0)
    st.on_worker(b"w", p.Ready("w", "both", "tiny", 8, 100, {}, 1, 1000))
    st.on_client(A, p.Submit("x", prompt="hi"))
    [gen] = of(st.on_client(B, p.Submit("x", prompt="hi")), p.Generate)
    out = st.on_worker(b"w", p.Failed(gen.request_id, gen.attempt, p.Code.INTERNAL, "boom", False))
    [err] = of(out, p.Error, FRONT, B)
    assert err.request_id == "x"


# ---------------------------------------------------------------------------------------------
# a deployment with CURVE on both broker sockets and the KV channel, and an HTTP API key

class Secure(Deployment):
    """A deployment with CURVE on both broker sockets and the KV channel, and an HTTP API key."""

    def __init__(self, keys):
        self.keys, self.curve = keys, as_client(keys, "alice")
        self.alice = self.curve
        self.broker_args = ("--curve-key", keys["broker"], "--client-keys", keys["clients"],
                            "--worker-keys", keys["workers"], "--api-key", API_KEY)
        super().__init__(http=True)
        try:
            for role, name in (("context", "ctx"), ("generation", "gen")):
                self.add_worker(role, name, options={"cache_transceiver_config": {"backend": "ZMQ"}},
                                extra=("--curve-key", keys[name], "--curve-server-key", keys["broker_public"],
                                       "--curve-peers", keys["workers"]))
        except BaseException:
            self.close()
            raise


@pytest.fixture(scope="module")
def secure(keys):
    dep = Secure(keys)
    try:
        yield dep
    finally:
        dep.close()


def drain(sock, seconds):
    """Every message a socket receives within ``seconds`` (the deadline of a silence check)."""
    got, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            got.append(sock.recv_multipart())
    return got


def dealer(ctx, address, curve=None):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(s)
    s.connect(address)
    return s


@pytest.mark.timeout(180)
def test_admitted_client_and_workers_are_served_end_to_end(secure):
    with Client(secure.frontend, timeout=60, curve=secure.alice) as c:
        out = c.generate(token_ids=list(range(3, 30)), max_tokens=6, ignore_eos=True)
    assert out.usage["completion_tokens"] == 6 and out.finish_reason == "length"
    assert out.timings["kv_transfer"] > 0        # the KV crossed the CURVE channel


@pytest.mark.timeout(180)
def test_clients_without_an_admitted_key_get_nothing(secure, keys):
    before = secure.stats()["counters"]["submitted"]
    ctx = zmq.Context()
    strangers = [dealer(ctx, secure.frontend),                                  # no CURVE at all
                 dealer(ctx, secure.frontend, as_client(keys, "mallory")),      # an unlisted key
                 dealer(ctx, secure.frontend, as_client(keys, "gen"))]          # a worker's key
    try:
        for i, s in enumerate(strangers):
            s.send_multipart(p.Ping(7).encode())
            s.send_multipart(p.Submit(f"stranger-{i}", prompt="secret?").encode())
        assert [drain(s, 1.5) for s in strangers] == [[], [], []]
    finally:
        for s in strangers:
            s.close(0)
        ctx.term()
    with Client(secure.frontend, timeout=5, curve=as_client(keys, "mallory")) as c:
        with pytest.raises(BrokerUnavailable):
            c.ping(timeout=1.0)
    assert secure.stats()["counters"]["submitted"] == before


@pytest.mark.timeout(180)
def test_rogue_workers_without_an_admitted_key_receive_no_prefill(secure, keys):
    """Finding 5: a Ready with a huge slot count and an hour's heartbeat would win every dispatch."""
    ctx = zmq.Context()
    rogues = [dealer(ctx, secure.backend), dealer(ctx, secure.backend, as_client(keys, "mallory")),
              dealer(ctx, secure.backend, as_client(keys, "alice"))]            # a client's key
    try:
        for i, s in enumerate(rogues):
            for role in ("context", "generation"):
                s.send_multipart(p.Ready(f"rogue-{i}-{role}", role, "tiny", 10**6, 10**6,
                                         {"backend": "ZMQ", "endpoint": "tcp://127.0.0.1:9"}, 1,
                                         60_000).encode())   # values an open broker accepts
        with Client(secure.frontend, timeout=60, curve=secure.alice) as c:
            outs = [c.generate(token_ids=[5, 6, 7], max_tokens=3, ignore_eos=True) for _ in range(4)]
        assert all(o.usage["completion_tokens"] == 3 for o in outs)
        assert [drain(s, 0.5) for s in rogues] == [[], [], []]
        assert {w["worker_id"] for w in secure.stats()["workers"]} == {"ctx", "gen"}
        secure.wait_idle()               # one final each, and no request, block or lease left over
    finally:
        for s in rogues:
            s.close(0)
        ctx.term()
    assert "refused a workers connection with unlisted CURVE key" in secure.children.tail("broker", 200)


@pytest.mark.timeout(180)
def test_a_real_worker_with_an_unlisted_key_never_registers_and_says_why(secure, keys):
    proc = secure.add_worker("generation", "mallory", options={"heartbeat_ms": 100, "broker_timeout_ms": 300},
                             wait=False, extra=("--curve-key", keys["mallory"],
                                                "--curve-server-key", keys["broker_public"]))
    deadline = time.monotonic() + 90
    while "refused this CURVE key" not in secure.children.tail("mallory", 50):
        secure.children.check_alive([proc], "the worker's refusal")
        assert time.monotonic() < deadline, secure.children.tail("mallory")
        time.sleep(0.1)
    assert KeyPair.load(keys["mallory"]).public.decode() in secure.children.tail("mallory", 50)
    assert {w["worker_id"] for w in secure.stats()["workers"]} == {"ctx", "gen"}
    with Client(secure.frontend, timeout=60, curve=secure.alice) as c:
        assert c.generate(token_ids=[4, 5], max_tokens=2, ignore_eos=True).usage["completion_tokens"] == 2


@pytest.mark.timeout(180)
def test_one_client_cannot_cancel_another_clients_request(secure, keys):
    with Client(secure.frontend, timeout=60, curve=secure.alice) as a, \
            Client(secure.frontend, timeout=60, curve=secure.alice) as b:
        stream = a.stream(token_ids=[5, 6, 7], max_tokens=40, ignore_eos=True, request_id="shared")
        b.cancel("shared")                       # names a's id: b has no such request
        mine = b.generate(token_ids=[9, 9], max_tokens=2, ignore_eos=True, request_id="shared")
        with stream:
            tokens = [t for ch in stream for t in ch.token_ids]
        assert stream.completion.finish_reason == "length" and len(tokens) == 40
        assert mine.finish_reason == "length" and mine.usage["completion_tokens"] == 2


def http(method, url, key=None, body=None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, method=method, headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.mark.timeout(180)
def test_http_needs_the_api_key_except_on_health_and_metrics(secure):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
    for key in (None, "sk-wrong-key-000", API_KEY[:-1]):
        for method, path, data in (("GET", "/v1/models", None), ("POST", "/v1/completions", body),
                                   ("POST", "/v1/chat/completions", {}), ("GET", "/nowhere", None)):
            status, headers, raw = http(method, secure.http + path, key, data)
            err = json.loads(raw)["error"]
            assert (status, err["code"], err["type"]) == (401, "invalid_api_key", "invalid_request_error"), path
            assert headers["WWW-Authenticate"] == "Bearer"
    assert http("GET", secure.http + "/health")[0] == 200
    assert http("GET", secure.http + "/v2/health/ready")[0] == 200 and http("GET", secure.http + "/v2/health/live")[0] == 200
    assert http("GET", secure.http + "/v2")[0] == 401 and http("GET", secure.http + "/v2", API_KEY)[0] == 200
    status, _, raw = http("GET", secure.http + "/metrics")
    assert status == 200 and b"# TYPE" in raw
    status, _, raw = http("POST", secure.http + "/v1/completions", API_KEY, body)
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2


@pytest.mark.timeout(180)
def test_the_openai_sdk_with_the_api_key_works_and_without_it_is_refused(secure):
    import openai
    ok = openai.OpenAI(base_url=secure.http + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    out = ok.completions.create(model="tiny", prompt="Hello", max_tokens=3)
    assert out.usage.completion_tokens == 3
    assert [m.id for m in ok.models.list().data] == ["tiny"]
    bad = openai.OpenAI(base_url=secure.http + "/v1", api_key="sk-not-the-key", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="tiny", prompt="Hello", max_tokens=3)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


def test_metrics_need_the_key_when_asked(tmp_path):
    from client.gateway import Gateway, GatewayThread
    gw = GatewayThread(Gateway("tcp://127.0.0.1:9", port=0, api_key=API_KEY, metrics_need_key=True))
    url = gw.start()
    try:
        assert http("GET", url + "/metrics")[0] == 401
        assert http("GET", url + "/health")[0] == 503          # open: no broker behind it
    finally:
        gw.stop()


# ---------------------------------------------------------------------------------------------
# the KV channel: CURVE, admitted generation workers only

def _pool(layout, n, fill):
    return torch.full((n, layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim),
                      fill, dtype=torch.float32)


def _pull(sink, handle, timeout=20.0):
    sink.start_pull("p1", handle, [0, 1])
    out, deadline = [], time.monotonic() + timeout
    while not out:
        assert time.monotonic() < deadline, f"no result in {timeout} s"
        out = sink.poll()
        time.sleep(0.002)
    return out[0]


@pytest.mark.timeout(60)
def test_kv_channel_serves_admitted_generation_workers_only(keys):
    from transfer.base import KvLayout, TransferError
    from transfer.config import CacheTransceiverConfig
    from transfer.messages import Start, encode
    from transfer.registry import create_sink, create_source
    lay = KvLayout(2, 2, 8, "float32", 4)
    cfg = CacheTransceiverConfig(backend="ZMQ", kv_transfer_timeout_ms=10_000)
    src_pool = _pool(lay, 8, 3.5)
    server = CurveServer(KeyPair.load(keys["ctx"]), {PEERS: load_public_dir(keys["workers"])})
    source = create_source(cfg, src_pool, lay, curve=server)
    sinks = []
    try:
        handle = source.register("t1", [2, 3], 8)
        assert handle["curve_key"] == KeyPair.load(keys["ctx"]).public.decode()
        mallory = create_sink(cfg, _pool(lay, 4, 0.0), lay, curve=KeyPair.load(keys["mallory"]))
        sinks.append(mallory)
        r = _pull(mallory, handle)
        assert not r.ok and "refused this worker's CURVE key" in str(r.error)
        keyless = create_sink(cfg, _pool(lay, 4, 0.0), lay)
        sinks.append(keyless)
        r = _pull(keyless, handle)
        assert not r.ok and isinstance(r.error, TransferError) and "no key pair" in str(r.error)
        ctx = zmq.Context()                      # a plain socket asking to start the transfer
        try:
            plain = dealer(ctx, source.endpoint)
            plain.send_multipart(encode(Start(1, "t1")))
            assert drain(plain, 1.0) == []
            plain.close(0)
        finally:
            ctx.term()
        gen_pool = _pool(lay, 4, 0.0)
        gen = create_sink(cfg, gen_pool, lay, curve=KeyPair.load(keys["gen"]))
        sinks.append(gen)
        r = _pull(gen, handle)
        assert r.ok, r.error
        assert torch.equal(gen_pool[:2], src_pool[2:4])
    finally:
        for s in sinks:
            s.close()
        source.close()


# ---------------------------------------------------------------------------------------------
# NIXL, UCX and MPI listen on the advertised interface only

LISTENERS = r"""
import json, os, subprocess, sys, torch
from transfer.base import KvLayout
from transfer.config import CacheTransceiverConfig
from transfer.registry import create_sink, create_source
backend = sys.argv[1]
lay = KvLayout(2, 2, 8, "float32", 4)
pool = lambda: torch.zeros(8, 2, 2, 4, 2, 8)
cfg = CacheTransceiverConfig(backend=backend)
src, sink = create_source(cfg, pool(), lay), create_sink(cfg, pool(), lay)
pids = {os.getpid(), os.getppid()} if backend == "MPI" else {os.getpid()}
lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
mine = [l.split()[3] for l in lines if any(f"pid={p}," in l for p in pids)]
print(json.dumps({"listening": mine, "devices": os.environ.get("UCX_NET_DEVICES")}), flush=True)
os._exit(0)      # MPI: no MPI_Finalize (see transfer/mpi_backend.py)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["NIXL", "UCX", "MPI", "ZMQ"])
def test_transfer_endpoints_listen_on_loopback_only(backend, tmp_path):
    from transfer.loopback import launcher
    script = tmp_path / "listeners.py"
    script.write_text(LISTENERS)
    env = _env()
    env.pop("UCX_NET_DEVICES", None)          # what a worker started by hand has
    out = subprocess.run([*launcher(backend), sys.executable, str(script), backend], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    listening = report["listening"]
    assert listening, "found no listening socket of the process"     # the channel at least
    assert all(a.startswith(("127.", "[::1]", "[::ffff:127.")) for a in listening), listening
    if backend != "ZMQ":
        assert report["devices"] == "lo" and len(listening) >= 2      # UCX listens too: on lo


# ---------------------------------------------------------------------------------------------
# `broker launch` from a disagg_config.yaml with an auth section

@pytest.mark.timeout(180)
def test_broker_launch_runs_curve_and_the_api_key_from_the_config(keys, tmp_path):
    from broker.config import load_disagg_config
    from broker.launch import Launch
    group = {"num_instances": 1, "num_threads": 1, "device": "cpu", "heartbeat_ms": 200,
             "cache_transceiver_config": {"backend": "ZMQ"}}
    path = tmp_path / "disagg.yaml"
    path.write_text(json.dumps({
        "model": "tiny", "hostname": "127.0.0.1", "port": 0, "context_servers": group,
        "generation_servers": group,
        "auth": {"curve_key": keys["broker"], "client_keys": keys["clients"], "worker_keys": keys["workers"],
                 "worker_key": os.path.relpath(keys["ctx"], tmp_path), "api_key": API_KEY}}))
    session = Launch(load_disagg_config(str(path)), "WARNING", http=True, http_port=0)
    try:
        session.start()
        session.wait_ready(120, progress=lambda line: None)
        assert http("GET", session.http_url + "/v1/models")[0] == 401
        status, _, raw = http("POST", session.http_url + "/v1/completions", API_KEY,
                              {"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2
        with Client(session.frontend, timeout=5, curve=as_client(keys, "mallory")) as c:
            with pytest.raises(BrokerUnavailable):
                c.ping(timeout=1.0)
    finally:
        session.stop(grace=0)


def test_command_lines_name_the_flag_and_file_of_a_bad_key(keys):
    from workers.cli import cli as worker_cli
    res = CliRunner().invoke(broker_cli, ["start", "--no-http", "--curve-key", keys["broker"]])
    assert res.exit_code == 2 and "--client-keys, --worker-keys not" in res.output
    res = CliRunner().invoke(broker_cli, ["start", "--no-http", "--curve-key", keys["broker_public"],
                                          "--client-keys", keys["clients"], "--worker-keys", keys["workers"]])
    assert res.exit_code == 2 and f"--curve-key={keys['broker_public']!r}: holds no secret-key" in res.output
    res = CliRunner().invoke(worker_cli, ["start", "--role", "generation", "--broker", "tcp://127.0.0.1:9",
                                          "--model", "tiny", "--curve-key", keys["gen"]])
    assert res.exit_code == 2 and "--curve-key is set but --curve-server-key is not" in res.output
    res = CliRunner().invoke(worker_cli, ["start", "--role", "context", "--broker", "tcp://127.0.0.1:9",
                                          "--model", "tiny", "--curve-key", keys["ctx"],
                                          "--curve-server-key", keys["broker_public"]])
    assert res.exit_code == 2 and "needs --curve-peers" in res.output


@pytest.mark.timeout(180)
def test_broker_bench_measures_curve_beside_the_plain_broker(tmp_path):
    out = tmp_path / "broker.json"
    res = subprocess.run([sys.executable, "-m", "bench.broker", "--runs", "1", "--duration", "0.3", "--warmup",
                          "0.1", "--latency-duration", "0.2", "--processes", "1", "--conns", "2",
                          "--concurrency", "8", "--curve", "--out", str(out)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert set(rep["summary"]) == {"direct-rt", "direct-seq", "broker", "broker-curve"}
    s = rep["summary"]["broker-curve"]
    assert s["errors"] == 0 and s["unfinished"] == 0 and rep["runs"]["broker-curve"][0]["completed"] > 0
    assert rep["headline"]["curve_vs_plain"] > 0 and "CURVE on both broker sockets" in res.stdout
