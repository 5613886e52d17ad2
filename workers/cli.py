"""``worker start``: run one context, generation or aggregated worker against a broker;
``worker export-tokenizer``: write a model's tokenizer for offline benchmark tools.

The command line only (click). It imports the worker, the engine and torch only once a worker
really starts, so ``worker --help`` and ``worker start --help`` answer at once.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket as pysocket
import sys

import click

from broker.cli import CONTEXT, CommandError, cluster_options, cluster_settings, log_level_option, run, setup_logging
from broker.discovery import ClusterSettings


@click.group(context_settings=CONTEXT)
def cli() -> None:
    """Workers of the disaggregated server."""


@cli.command(short_help="start a worker and register it with the broker")
@click.option("--role", "--server-role", "--server_role", "role", required=True,
              type=click.Choice(["context", "generation", "both"], case_sensitive=False),
              help="context: prefill and hand the KV cache over; generation: pull the KV cache and "
                   "decode; both: serve whole requests (aggregated)")
@click.option("--broker", default=None, metavar="tcp://HOST:PORT",
              help="the broker's backend (worker-facing) address (or give --disagg-cluster-uri)")
@cluster_options
@click.option("--discovery-timeout", type=float, default=600, show_default=True,
              help="with etcd: seconds to wait for a broker to appear there")
@click.option("--model", default="smollm2-135m",
              help="smollm2-135m (embedded default), tiny or tiny:SEED (seeded test model), a .gguf file, or a "
                   "Hugging Face directory with safetensors and tokenizer.json (default: smollm2-135m)")
@click.option("--extra-llm-api-options", "--extra_llm_api_options", "options", metavar="YAML", default=None,
              help="TensorRT-LLM-style worker options: cache_transceiver_config, kv_cache_config, "
                   "max_batch_size, max_num_tokens, tokens_per_block, dtype, quantization "
                   "(auto|none|fp16|int8), device, ...")
@click.option("--served-model-name", default=None, metavar="NAME",
              help="the model name this worker announces and requests are routed by (default: --model)")
@click.option("--worker-id", default=None, help="name shown in the broker's logs (default: ROLE-HOST-PID)")
@click.option("--host", default=None, metavar="ADDRESS",
              help="address the KV transfer endpoints listen on: the control channel, and NIXL/UCX/MPI "
                   "through $UCX_NET_DEVICES; 0.0.0.0 for every interface (default: this host's address "
                   "on the route toward the broker, or etcd: 127.0.0.1 when that is on loopback)")
@click.option("--advertise-host", default=None, metavar="ADDRESS",
              help="address peers reach the KV endpoints at, where it differs from --host (a wildcard "
                   "--host, NAT) (default: --host, or for a wildcard the address toward the broker)")
@click.option("--curve-key", default=None, metavar="KEY_SECRET_FILE",
              help="this worker's CURVE key pair (`broker keygen`), for the broker and the KV channel")
@click.option("--curve-server-key", default=None, metavar="KEY_FILE", help="the broker's CURVE public key")
@click.option("--curve-peers", default=None, metavar="DIR",
              help="context workers with --curve-key: directory of the generation workers' public "
                   "keys (*.key) its KV channel admits")
@click.option("--device", default=None, metavar="auto|cpu|cuda|cuda:N",
              help="where the model, KV cache and sampling run (default: the options file's device, "
                   "else auto: cuda:0 where CUDA is present, else cpu)")
@click.option("--drain-timeout", type=float, default=60, show_default=True,
              help="seconds a drain (SIGTERM, `worker drain`) may take: past them the worker leaves "
                   "with what it still holds, as a dead worker's")
@click.option("--exit-with-parent", is_flag=True,
              help="stop when the parent process exits (used by `broker launch`)")
@log_level_option
def start(role, broker, cluster_uri, cluster_name, lease_interval, lease_ttl,
          discovery_timeout, model, options, served_model_name, worker_id, host, advertise_host, curve_key,
          curve_server_key, curve_peers, device, drain_timeout, exit_with_parent, log_level) -> None:
    """Start a worker. It loads the model, connects to the broker's backend address (--broker,
    or found through --disagg-cluster-uri), registers its role and capacity, and serves.

    SIGTERM drains it: it takes no new work, finishes what it holds (a context worker keeps its
    KV until pulled or its lease expires), leaves etcd, disconnects and exits 0; a second SIGTERM
    or --drain-timeout makes it leave at once. SIGINT stops it at once."""
    setup_logging(log_level)
    role = role.lower()
    if (broker is None) == (cluster_uri is None):
        raise click.UsageError("give exactly one of --broker tcp://HOST:PORT and --disagg-cluster-uri "
                               f"(got --broker={broker!r}, --disagg-cluster-uri={cluster_uri!r})")
    from broker.addresses import worker_transfer_hosts
    from broker.auth import curve_client, load_public_dir
    from broker.config import ConfigError
    from transfer.base import TransferError
    from workers.options import load_options
    from workers.worker import Worker
    try:
        opts = load_options(options)
        if device is not None:
            opts = dataclasses.replace(opts, device=device)
        curve = curve_client(curve_key, curve_server_key)
        peers = load_public_dir(curve_peers, "--curve-peers") if curve_peers else None
        if peers and curve is None:
            raise ConfigError(f"--curve-peers={curve_peers!r} is set but --curve-key is not")
        cluster = None
        if cluster_uri is not None:
            cluster = cluster_settings(ClusterSettings(), cluster_uri, cluster_name, lease_interval, lease_ttl)
            if cluster_uri.startswith("tcp://"):     # the broker's own address: no etcd
                broker, cluster = cluster_uri, None
        # where the KV endpoints bind and what they advertise: broker/addresses.py (a `both`
        # worker has none)
        host, advertise_host = (worker_transfer_hosts(broker or cluster_uri, host, advertise_host)
                                if role != "both" else (host or "127.0.0.1", advertise_host))
        worker = Worker(role, broker or "", model, opts, worker_id, host, exit_with_parent=exit_with_parent,
                        curve=curve, peers=peers, served_model_name=served_model_name,
                        advertise_host=advertise_host, drain_timeout=drain_timeout)
    except (TransferError, ValueError, OSError) as e:   # ConfigError is a ValueError
        raise CommandError("worker", str(e)) from None
    link = None
    if cluster is not None:
        from broker.discovery import WorkerLink
        link = WorkerLink(cluster, worker.worker_id, {"worker_id": worker.worker_id, "role": role,
                                                      "model": worker.model_name, "pid": os.getpid(),
                                                      "host": pysocket.gethostname(),
                                                      "transfer": worker.transfer_info})
        link.start()            # registered (and visible in etcd) while it waits for a broker
        try:
            worker.broker_addr = link.wait_broker(discovery_timeout)
        except TimeoutError as e:
            link.close()
            raise CommandError("worker", str(e)) from None
        worker.discovery = link

    signal.signal(signal.SIGTERM, lambda *_: worker.drain("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    print(f"worker {worker.worker_id} role={role} model={model} ({worker.precision.describe()}) "
          f"transfer={worker.transfer_info or 'none'}", flush=True)
    try:
        worker.run()
    finally:
        if link is not None:
            link.close()        # revokes the lease: the worker's key goes at once
    if worker.failure:
        raise CommandError("worker", f"left service: {worker.failure}")


@cli.command(short_help="make running workers finish their work and leave")
@click.option("--pid", "pids", type=int, multiple=True, metavar="PID",
              help="a worker process on this host: sent SIGTERM (repeatable)")
@click.option("--worker-id", "worker_ids", multiple=True, metavar="ID",
              help="a worker registered with the broker at --broker, by its --worker-id (repeatable)")
@click.option("--broker", default=None, metavar="tcp://HOST:PORT|etcd://HOST:PORT",
              help="with --worker-id: the broker's frontend (client) address, or the etcd server it "
                   "registered in (with --cluster-name)")
@click.option("--cluster-name", "--cluster_name", default="default", show_default=True,
              help="with an etcd:// --broker: the cluster whose broker to ask")
@click.option("--curve-key", default=None, metavar="KEY_SECRET_FILE",
              help="with a CURVE broker: this client's key pair (`broker keygen`)")
@click.option("--curve-server-key", default=None, metavar="KEY_FILE", help="the broker's CURVE public key")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="wait until every worker named has left")
@click.option("--timeout", type=float, default=120, show_default=True, help="seconds to wait, with --wait")
def drain(pids, worker_ids, broker, cluster_name, curve_key, curve_server_key, wait, timeout) -> None:
    """Drain workers: each takes no new work, finishes what it holds, leaves etcd, disconnects
    and exits 0 (what SIGTERM does; a second SIGTERM, or the worker's --drain-timeout, makes it
    leave at once). --pid signals a local process; --worker-id asks the broker, which stops
    dispatching to it at once and tells it to drain. Fails (exit 2) if a worker is not found, or
    with --wait, is still there after --timeout."""
    import time
    if not pids and not worker_ids:
        raise click.UsageError("name the workers to drain: --pid PID or --worker-id ID (with --broker)")
    if worker_ids and broker is None:
        raise click.UsageError("--worker-id needs --broker: the broker's frontend address or etcd://HOST:PORT")
    deadline = time.monotonic() + timeout
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            raise CommandError("worker", f"no process {pid} (--pid)") from None
        except PermissionError:
            raise CommandError("worker", f"not allowed to signal process {pid} (--pid)") from None
        click.echo(f"draining pid {pid}")
    if worker_ids:
        from broker.auth import curve_client
        from broker.config import ConfigError
        from client import Client, ClientError
        try:
            curve = curve_client(curve_key, curve_server_key)
            with Client(broker, cluster_name=cluster_name, curve=curve, timeout=timeout) as c:
                for wid in worker_ids:
                    if c.drain_worker(wid) == 0:
                        raise CommandError("worker", f"no worker {wid!r} is registered with the broker at "
                                                     f"{c.address}")
                    click.echo(f"draining worker {wid}")
                while wait:
                    up = {w["worker_id"] for w in c.ping()["workers"]} & set(worker_ids)
                    if not up:
                        break
                    if time.monotonic() > deadline:
                        raise CommandError("worker", f"still registered after {timeout:g} s: {', '.join(sorted(up))}")
                    time.sleep(0.2)
        except (ClientError, ConfigError) as e:
            raise CommandError("worker", str(e)) from None
    while wait and pids:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive:
            break
        if time.monotonic() > deadline:
            raise CommandError("worker", f"still running after {timeout:g} s: pid {', '.join(map(str, alive))}")
        time.sleep(0.2)
    if wait:
        click.echo("drained")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:      # a zombie (our own child, not yet reaped) has left already
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


@cli.command("export-tokenizer", short_help="write a model's tokenizer as a Hugging Face folder")
@click.option("--model", default="smollm2-135m",
              help="smollm2-135m (embedded default), a .gguf file, or a Hugging Face directory "
                   "(default: smollm2-135m)")
@click.option("--overwrite", is_flag=True, help="replace tokenizer files already in DIR")
@click.argument("out_dir", metavar="DIR")
def export_tokenizer(model, overwrite, out_dir) -> None:
    """Write DIR/tokenizer.json, tokenizer_config.json (with the chat template) and
    special_tokens_map.json for MODEL, so that benchmark tools (AIPerf, guidellm) and
    transformers' AutoTokenizer count tokens offline exactly as the server does. Reads the
    model's vocabulary only, not its weights."""
    from workers.engine.tokenizer_export import export_tokenizer as export
    try:
        paths = export(model, out_dir, overwrite=overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise CommandError("worker", str(e)) from None
    for path in paths:
        click.echo(path)


def main(argv=None) -> int:
    return run(cli, "worker", argv)


if __name__ == "__main__":
    sys.exit(main())
