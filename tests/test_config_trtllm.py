"""TensorRT-LLM configuration compatibility: its disagg_config.yaml and worker YAML, unchanged."""
import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from broker.config import ConfigError, load_disagg_config
from broker.launch import ping
from client import Client
from tests.harness import ROOT, Deployment, _env
from workers.cli import start as worker_start
from workers.options import load_options

pytestmark = pytest.mark.timeout(120)

# as in TensorRT-LLM's examples/disaggregated: model and port are overridden on the command line
TRTLLM_DISAGG = """\
hostname: 127.0.0.1
port: 8000
model: TinyLlama/TinyLlama-1.1B-Chat-v1.0
backend: pytorch
free_gpu_memory_fraction: 0.25
disable_overlap_scheduler: True
max_retries: 1
perf_metrics_max_requests: 0
context_servers:
  num_instances: 1
  tensor_parallel_size: 1
  pipeline_parallel_size: 1
  max_batch_size: 16
  max_num_tokens: 256
  kv_cache_config:
    free_gpu_memory_fraction: 0.2
    enable_block_reuse: False
  cache_transceiver_config:
    backend: DEFAULT
    max_tokens_in_buffer: 2048
  router:
    type: round_robin
  urls:
    - "localhost:8001"
generation_servers:
  num_instances: 1
  tensor_parallel_size: 1
  pipeline_parallel_size: 1
  max_batch_size: 64
  cuda_graph_config:
    enable_padding: True
  kv_cache_config:
    free_gpu_memory_fraction: 0.2
  cache_transceiver_config:
    backend: DEFAULT
  router:
    type: load_balancing
    use_tokens: False
  urls:
    - "localhost:8002"
disagg_cluster:
  cluster_uri: http://localhost:18000
  cluster_name: example
  minimal_instances:
    context_servers: 1
    generation_servers: 1
  heartbeat_interval_sec: 1
  inactive_timeout_sec: 2
"""

# a TensorRT-LLM context worker's --extra_llm_api_options file
TRTLLM_CTX_WORKER = """\
disable_overlap_scheduler: True
enable_chunked_prefill: False
print_iter_log: False
max_batch_size: 8
max_num_tokens: 256
cuda_graph_config: null
kv_cache_config:
  free_gpu_memory_fraction: 0.3
  enable_block_reuse: False
  tokens_per_block: 32
cache_transceiver_config:
  backend: DEFAULT
  max_tokens_in_buffer: 2048
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_trtllm_disagg_config_parses(tmp_path):
    cfg = load_disagg_config(write(tmp_path, "disagg_config.yaml", TRTLLM_DISAGG))
    assert (cfg.hostname, cfg.port, cfg.backend) == ("127.0.0.1", 8000, "pytorch")
    assert cfg.context_servers.num_instances == 1 and cfg.context_servers.urls == ("localhost:8001",)
    assert cfg.generation_servers.router == {"type": "load_balancing", "use_tokens": False}
    # the routers take effect (broker/routers.py); conditional disaggregation is off without its section
    r = cfg.routing
    assert (r.context.type, r.generation.type, r.max_local_prefill_length) == ("round_robin", "load_balancing", None)
    assert cfg.min_workers == {"context": 1, "generation": 1}
    # top-level engine keys reach both groups, as in TensorRT-LLM
    assert cfg.context_servers.options["disable_overlap_scheduler"] is True
    assert cfg.generation_servers.options["free_gpu_memory_fraction"] == 0.25
    assert cfg.context_servers.options["max_num_tokens"] == 256


def test_minimum_comes_from_minimal_instances_else_num_instances(tmp_path):
    cfg = load_disagg_config(write(tmp_path, "a.yaml", """\
        context_servers: {num_instances: 3}
        generation_servers: {num_instances: 2}
        disagg_cluster: {cluster_uri: 'etcd://h:2379', minimal_instances: {context_servers: 2}}
        """))
    assert cfg.min_workers == {"context": 2, "generation": 1}
    assert cfg.minimal_instances == {"context": 2, "generation": 1}    # the broker's admission gate
    cfg = load_disagg_config(write(tmp_path, "b.yaml", """\
        context_servers: {num_instances: 3}
        generation_servers: {num_instances: 2}
        """))
    assert cfg.min_workers == {"context": 3, "generation": 2}
    assert cfg.minimal_instances is None       # no disagg_cluster: /health only, no admission gate


@pytest.mark.parametrize("text,key", [
    ("colour: red\n", "colour"),
    ("context_servers: {num_instances: 1, max_batch_sise: 4}\n", "context_servers.max_batch_sise"),
    ("generation_servers: {kv_cache_config: {max_tokenz: 5}}\n", "generation_servers.kv_cache_config.max_tokenz"),
    ("disagg_cluster: {cluster_uri: x, minimal_instance: {}}\n", "disagg_cluster.minimal_instance"),
    ("disagg_cluster: {cluster_uri: x, minimal_instances: {ctx: 1}}\n", "disagg_cluster.minimal_instances.ctx"),
    ("broker: {heartbeat: 1}\n", "broker.heartbeat"),
])
def test_unknown_keys_name_the_key_and_the_file(tmp_path, text, key):
    path = write(tmp_path, "disagg_config.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_disagg_config(path)
    assert key in str(e.value) and path in str(e.value)


@pytest.mark.parametrize("text,needle", [
    ("context_servers: {num_instances: 2, urls: ['a:1']}\n", "urls lists 1 servers but num_instances is 2"),
    ("context_servers: {router: {type: random}}\n", "router.type='random'"),
    ("max_batch_size: 4\ncontext_servers: {max_batch_size: 8}\n", "different values"),
    ("port: 99999\n", "port"),
    ("schedule_style: generation_first\n", "context_first"),
])
def test_bad_values_are_clear(tmp_path, text, needle):
    path = write(tmp_path, "c.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_disagg_config(path)
    assert needle in str(e.value) and path in str(e.value)


def test_trtllm_worker_yaml_loads_and_both_option_spellings_are_accepted(tmp_path):
    path = write(tmp_path, "ctx_extra-llm-api-config.yaml", TRTLLM_CTX_WORKER)
    opts = load_options(path)
    assert (opts.max_batch_size, opts.max_num_tokens, opts.tokens_per_block) == (8, 256, 32)
    assert opts.cache_transceiver.max_tokens_in_buffer == 2048
    for flag in ("--extra_llm_api_options", "--extra-llm-api-options"):
        args = worker_start.make_context("start", ["--role", "context", "--broker", "tcp://x:1", flag, path]).params
        assert args["options"] == path
    bad = write(tmp_path, "bad.yaml", "kv_cache_config: {enable_blok_reuse: true}\n")
    with pytest.raises(Exception) as e:
        load_options(bad)
    assert "kv_cache_config.enable_blok_reuse" in str(e.value) and bad in str(e.value)


def _lines_until(proc, prefix, timeout):
    """Read stdout (unbuffered, by the fd) until a line starting with ``prefix``; a deadline bounds it."""
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        if not sel.select(max(0.0, deadline - time.monotonic())):
            break
        data = os.read(fd, 65536)
        if not data:
            break
        buf += data
        for line in buf.decode(errors="replace").splitlines():
            if line.startswith(prefix):
                return line
    raise AssertionError(f"no {prefix!r} line; got {buf.decode(errors='replace')!r}")


def test_broker_launch_runs_a_trtllm_config_unchanged(tmp_path):
    path = write(tmp_path, "disagg_config.yaml", TRTLLM_DISAGG)
    proc = subprocess.Popen([sys.executable, "-m", "broker.cli", "launch", "-c", path, "--model", "tiny",
                             "--http-port", "0", "--ready-timeout", "90"],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "launch.log", "w"),
                            env=_env(), cwd=ROOT)
    pids = []
    try:
        line = _lines_until(proc, "ready:", 100)
        parts = dict(w.split("=", 1) for w in line.split() if "=" in w)
        stats = ping(parts["frontend"])
        pids = [w["pid"] for w in stats["workers"]]
        assert sorted(w["role"] for w in stats["workers"]) == ["context", "generation"]
        http = parts["http"]
        with urllib.request.urlopen(http + "/health", timeout=10) as r:
            assert r.status == 200
        req = urllib.request.Request(http + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "tiny", "max_tokens": 5, "ignore_eos": True,
                                                      "messages": [{"role": "user", "content": "hi"}]}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read())
        assert body["usage"]["completion_tokens"] == 5
        with Client(parts["frontend"], timeout=60) as c:      # the ZeroMQ clients work beside it
            assert len(c.generate(token_ids=[1, 2, 3], max_tokens=4).token_ids) == 4
        proc.send_signal(signal.SIGTERM)                        # stops its workers too
        assert proc.wait(30) == 0
        for pid in pids:
            deadline = time.monotonic() + 10
            while _alive(pid):
                assert time.monotonic() < deadline, f"worker {pid} outlived broker launch"
                time.sleep(0.05)
    finally:
        for pid in pids + [proc.pid]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()


def _alive(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_broker_start_with_the_config_and_a_trtllm_worker_yaml(tmp_path):
    cfg = write(tmp_path, "disagg_config.yaml", TRTLLM_DISAGG)
    opts = write(tmp_path, "ctx_extra-llm-api-config.yaml", TRTLLM_CTX_WORKER)
    with Deployment(http=True, config=cfg) as d:
        for role in ("context", "generation"):      # both start at once; the harness kills them by pid
            proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "start", "--role", role,
                                     "--broker", d.backend, "--model", "tiny", "--worker-id", role,
                                     "--extra_llm_api_options", opts],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
            d.procs.append(proc)
            d.workers[role] = proc
        for role, proc in d.workers.items():
            d.wait_for(lambda s: any(w["worker_id"] == role for w in s["workers"]), 60, f"{role} ready", proc)
        with urllib.request.urlopen(d.http + "/health", timeout=10) as r:
            assert json.loads(r.read())["minimum"] == {"context": 1, "generation": 1}
        with urllib.request.urlopen(d.http + "/v1/models", timeout=10) as r:
            ids = [m["id"] for m in json.loads(r.read())["data"]]
        assert "tiny" in ids and "TinyLlama/TinyLlama-1.1B-Chat-v1.0" in ids   # the config's and the workers'
        req = urllib.request.Request(d.http + "/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "tiny", "prompt": [4] * 70, "max_tokens": 3,
                                                      "ignore_eos": True}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["usage"] == {"prompt_tokens": 70, "completion_tokens": 3,
                                                     "total_tokens": 73,
                                                     "prompt_tokens_details": {"cached_tokens": 0}}
        d.wait_idle()


# ---------------------------------------------------------------------------------------------
# one ConfigError, pydantic's key paths, and no silent no-ops

def test_one_config_error_class_everywhere():
    import transfer.config
    assert transfer.config.ConfigError is ConfigError


@pytest.mark.parametrize("text,words", [
    ("context_servers: {kv_cache_config: {max_tokens: 0}}\n",
     ["context_servers.kv_cache_config.max_tokens=0", "greater than or equal to 1"]),
    ("generation_servers: {max_batch_size: '8'}\n", ["generation_servers.max_batch_size='8'", "integer"]),
    ("context_servers: {max_num_tokens: 99999999999999999999999}\n",
     ["context_servers.max_num_tokens=99999999999999999999999"]),
    ("broker: {liveness: 0}\n", ["broker.liveness=0"]),
    ("context_servers: {urls: [1]}\n", ["context_servers.urls[0]=1"]),
    ("disagg_cluster: {minimal_instances: {context_servers: -1}}\n",
     ["disagg_cluster.minimal_instances.context_servers=-1"]),
    ("disagg_cluster: {inactive_interval_sec: 2, inactive_timeout_sec: 3}\n",
     ["inactive_interval_sec=2", "inactive_timeout_sec=3", "disagree"]),
])
def test_bad_values_name_the_file_the_dotted_key_and_the_value(tmp_path, text, words):
    path = write(tmp_path, "disagg.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_disagg_config(path)
    assert str(e.value).startswith(f"{path}: ") and all(w in str(e.value) for w in words), str(e.value)


def test_a_bad_group_option_is_reported_against_disagg_config_not_the_file_written_for_the_worker(tmp_path):
    from broker.config import worker_options
    from workers.options import parse_options
    path = write(tmp_path, "disagg.yaml", """\
        max_num_tokens: 0.5
        context_servers: {max_batch_size: 4, cache_transceiver_config: {backend: TCP}}
        """)
    with pytest.raises(ConfigError) as e:          # checked when the config is read ...
        load_disagg_config(path)
    assert str(e.value).startswith(f"{path}: max_num_tokens=0.5"), str(e.value)
    path = write(tmp_path, "disagg.yaml", """\
        max_num_tokens: 64
        context_servers: {max_batch_size: 4, cache_transceiver_config: {backend: TCP}}
        """)
    cfg = load_disagg_config(path)       # ... but the transfer settings are the worker's to check
    file, doc = worker_options(cfg, "context_servers")
    assert file is None and (doc["max_batch_size"], doc["max_num_tokens"]) == (4, 64)
    written = str(tmp_path / "tmp" / "context_servers.yaml")
    with pytest.raises(ConfigError) as e:
        parse_options(doc, written)
    assert str(e.value).startswith(f"{path}: context_servers.cache_transceiver_config.backend='TCP'"), str(e.value)
    doc["cache_transceiver_config"]["backend"], doc["max_num_tokens"] = "ZMQ", -1
    with pytest.raises(ConfigError) as e:
        parse_options(doc, written)
    assert str(e.value).startswith(f"{path}: max_num_tokens=-1"), str(e.value)


def test_broker_launch_reports_a_bad_group_option_against_the_users_file(tmp_path):
    path = write(tmp_path, "disagg.yaml", """\
        model: tiny
        context_servers: {num_instances: 1, cache_transceiver_config: {backend: TCP}}
        generation_servers: {num_instances: 1}
        """)
    proc = subprocess.run([sys.executable, "-m", "broker.cli", "launch", "-c", path, "--no-http",
                           "--ready-timeout", "120"], capture_output=True, text=True, env=_env(), timeout=180)
    assert proc.returncode != 0
    assert f"worker: error: {path}: context_servers.cache_transceiver_config.backend='TCP'" in proc.stderr, proc.stderr


def test_group_options_over_the_groups_own_file_keep_each_keys_origin(tmp_path):
    from broker.config import worker_options
    from workers.options import parse_options
    own = write(tmp_path, "ctx.yaml", "max_num_tokens: -3\n")
    path = write(tmp_path, "disagg.yaml", "context_servers: {extra_llm_api_options: ctx.yaml, max_batch_size: 4}\n")
    _, doc = worker_options(load_disagg_config(path), "context_servers")
    with pytest.raises(ConfigError) as e:
        parse_options(doc, "/tmp/elsewhere.yaml")
    assert str(e.value).startswith(f"{own}: max_num_tokens=-3"), str(e.value)
    path = write(tmp_path, "plain.yaml", "context_servers: {extra_llm_api_options: ctx.yaml}\n")
    assert worker_options(load_disagg_config(path), "context_servers") == (own, None)


def _notices(caplog):
    return [r.getMessage() for r in caplog.records if "not supported" in r.getMessage()]


def test_every_accepted_but_ignored_disagg_key_is_logged_once_with_its_reason(tmp_path, caplog):
    caplog.set_level("INFO")
    path = write(tmp_path, "disagg.yaml", """\
        max_retries: 2
        context_servers:
          router: {type: kv_cache_aware, tokens_per_block: 32}
          urls: ["h:1"]
        generation_servers:
          router: {type: round_robin, use_tokens: true}
        disagg_cluster:
          cluster_uri: http://localhost:18000
          cluster_name: prod
          heartbeat_interval_sec: 1
          inactive_interval_sec: 5
        """)
    load_disagg_config(path)
    lines = _notices(caplog)
    for key, reason in [("context_servers.router.tokens_per_block", "block size each worker announces"),
                        ("generation_servers.router.use_tokens", "round_robin router has no such option"),
                        ("context_servers.urls", "urls are not used"),
                        ("disagg_cluster.cluster_uri='http://localhost:18000'", "never over HTTP"),
                        ("max_retries", "broker.max_attempts")]:
        hits = [m for m in lines if f"{path}: {key} is not supported" in m]
        assert len(hits) == 1 and reason in hits[0], (key, lines)
    assert not any("minimal_instances" in m or "cluster_name" in m for m in lines)
    assert not any(m.endswith(".router is not supported") or "router.type" in m for m in lines)


def test_every_accepted_but_ignored_worker_key_is_logged_once_with_its_reason(tmp_path, caplog):
    caplog.set_level("INFO")
    path = write(tmp_path, "w.yaml", """\
        tensor_parallel_size: 1
        kv_cache_config: {max_tokens: 4096, max_gpu_total_bytes: 9, enable_block_reuse: false,
                          enable_partial_reuse: true}
        """)
    opts = load_options(path)
    assert opts.kv_max_tokens == 4096 and opts.block_reuse is False
    lines = _notices(caplog)
    for key, reason in [("kv_cache_config.max_gpu_total_bytes", "sized by kv_cache_config.max_tokens"),
                        ("kv_cache_config.enable_partial_reuse", "shares whole blocks only"),
                        ("tensor_parallel_size", "no tensor, pipeline")]:
        hits = [m for m in lines if f"{path}: {key} is not supported" in m]
        assert len(hits) == 1 and reason in hits[0], (key, lines)
    assert len(lines) == 3 and not any("max_tokens is" in m for m in lines)


def test_disagg_cluster_settings_are_read_with_trtllm_defaults(tmp_path):
    cfg = load_disagg_config(write(tmp_path, "a.yaml", """\
        disagg_cluster: {cluster_uri: 'etcd://h:2379', cluster_name: prod, inactive_interval_sec: 12}
        """))
    assert (cfg.cluster.cluster_uri, cfg.cluster.cluster_name) == ("etcd://h:2379", "prod")
    assert (cfg.cluster.heartbeat_interval_sec, cfg.cluster.inactive_timeout_sec) == (5.0, 12)
    assert load_disagg_config(write(tmp_path, "b.yaml", "port: 1\n")).cluster.cluster_uri is None


@pytest.mark.parametrize("text,words", [
    ("disagg_cluster: {cluster_uri: 'etcd:/h'}\n", ["disagg_cluster.cluster_uri='etcd:/h'", "etcd://HOST:PORT"]),
    ("disagg_cluster: {cluster_uri: 'etcd://h:2379', heartbeat_interval_sec: 3, inactive_timeout_sec: 2}\n",
     ["heartbeat_interval_sec=3", "inactive_timeout_sec=2"]),
])
def test_bad_disagg_cluster_settings_name_the_key_and_the_value(tmp_path, text, words):
    path = write(tmp_path, "c.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_disagg_config(path)
    assert path in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
