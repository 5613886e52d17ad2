"""``broker start`` (the broker alone) and ``broker launch`` (broker + workers from a config).

The command line only (click): flags become a ``BrokerConfig``/``DisaggConfig`` and a call into
``broker.server`` or ``broker.launch``. Also the pieces ``worker`` shares (``run``, ``CommandError``,
``log_level_option``). It must never import torch: ``broker --help`` has to answer at once.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from typing import Optional

import click

from broker.addresses import broker_published
from broker.auth import CONFIG_NAMES, api_key_from, broker_curve, self_client
from broker.auth import keygen as keygen_files
from broker.config import BrokerConfig, ConfigError, DisaggConfig, load_disagg_config
from broker.discovery import ClusterSettings, register_broker

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class CommandError(click.ClickException):
    """A setting the command cannot use (a bad config file, an unbindable address): printed as
    ``PROG: error: MESSAGE`` with exit code 2, as the usage errors are."""
    exit_code = 2

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog

    def show(self, file=None) -> None:
        click.echo(f"{self.prog}: error: {self.format_message()}", err=True)


log_level_option = click.option("--log-level", default="INFO", show_default=False,
                                type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
                                help="log verbosity on stderr (default: INFO)")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(group: click.Group, prog: str, argv: Optional[list] = None) -> int:
    """Run a click command line as ``prog`` and return its exit code (click would exit)."""
    try:
        group.main(args=argv, prog_name=prog, standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def _advertise_option(f):
    return click.option("--advertise-host", default=None, metavar="ADDRESS",
                        help="the host this broker's addresses are published at (etcd) and given to the "
                             "workers `broker launch` starts, where peers reach it at another address than "
                             "it binds (default: each bound address; a wildcard one: the config's hostname "
                             "unless that is a wildcard or loopback, else this host's default-route "
                             "address)")(f)


def _http_options(f):
    f = click.option("--no-http", is_flag=True, help="do not start the HTTP gateway")(f)
    return click.option("--http-port", type=int, default=None,
                        help="port of the OpenAI-compatible HTTP gateway; 0 picks a free one "
                             "(default: the config's port, 8000 without a config)")(f)


def _auth_options(f):
    """The broker's CURVE keys and HTTP API key (each over the config's ``auth`` section)."""
    for opt in reversed([
        click.option("--curve-key", default=None, metavar="KEY_SECRET_FILE",
                     help="the broker's CURVE key pair (`broker keygen`): CURVE on both sockets"),
        click.option("--client-keys", default=None, metavar="DIR",
                     help="directory of the client public keys (*.key) CURVE admits"),
        click.option("--worker-keys", default=None, metavar="DIR",
                     help="directory of the worker public keys (*.key) CURVE admits"),
        click.option("--api-key", default=None, help="HTTP API key: every route but /health and "
                     "/metrics needs 'Authorization: Bearer KEY' (default: auth.api_key, $DSRV_API_KEY)"),
    ]):
        f = opt(f)
    return f


_C = ClusterSettings()


def cluster_options(f):
    """``disagg_cluster``'s settings as flags (over the config's), shared with ``worker start``."""
    for opt in reversed([
        click.option("--disagg-cluster-uri", "--disagg_cluster_uri", "cluster_uri", default=None,
                     metavar="etcd://HOST:PORT|tcp://HOST:PORT",
                     help="where workers find the broker: an etcd server, or the broker's own backend "
                          "address (default: disagg_cluster.cluster_uri)"),
        click.option("--cluster-name", "--cluster_name", default=None,
                     help=f"namespace of this cluster's keys in etcd (default {_C.cluster_name!r}; the broker: "
                          "its config's disagg_cluster.cluster_name)"),
        click.option("--heartbeat-interval-sec", "--heartbeat_interval_sec", "lease_interval", type=float,
                     default=None, help="with etcd: seconds between renewals of the etcd lease "
                                        f"(default {_C.heartbeat_interval_sec:g}, or the config's)"),
        click.option("--inactive-timeout-sec", "--inactive_timeout_sec", "lease_ttl", type=float, default=None,
                     help="with etcd: TTL of the etcd lease, seconds: a killed process's key goes after "
                          f"it (default {_C.inactive_timeout_sec:g}, or the config's)"),
    ]):
        f = opt(f)
    return f


def cluster_settings(base: ClusterSettings, uri: Optional[str], name: Optional[str],
                     interval: Optional[float], ttl: Optional[float]) -> ClusterSettings:
    """``base`` with the flags that are set; ConfigError naming the setting for a bad one."""
    over = {"cluster_uri": uri, "cluster_name": name, "heartbeat_interval_sec": interval,
            "inactive_timeout_sec": ttl}
    s = dataclasses.replace(base, **{k: v for k, v in over.items() if v is not None})
    try:
        return s.check("--" if uri else "disagg_cluster.")
    except ValueError as e:
        raise ConfigError(str(e).replace("--cluster_uri", "--disagg-cluster-uri")) from None


@click.group(context_settings=CONTEXT)
def cli() -> None:
    """The disaggregated-serving broker."""


_D = BrokerConfig()


@cli.command(short_help="run the broker alone")
@click.option("--frontend", default=None, metavar="tcp://HOST:PORT",
              help="client-facing address (default tcp://127.0.0.1:0, or the config's)")
@click.option("--backend", default=None, metavar="tcp://HOST:PORT",
              help="worker-facing address (default tcp://127.0.0.1:0, or the config's)")
@click.option("-c", "--config", default=None, help="disagg_config.yaml to take broker settings from")
@click.option("--heartbeat-interval", type=float, default=None,
              help=f"seconds between heartbeats to workers (default {_D.heartbeat_interval_s})")
@click.option("--liveness", type=int, default=None,
              help=f"missed worker heartbeats before a worker is expired (default {_D.liveness})")
@click.option("--max-queue", type=int, default=None,
              help=f"queued requests past which new ones get OVERLOADED (default {_D.max_queue})")
@click.option("--kv-lease", type=float, default=None,
              help=f"seconds a context worker holds KV waiting for a pull (default {_D.kv_lease_s})")
@click.option("--request-timeout", type=float, default=None,
              help=f"deadline of requests that set none, seconds (default {_D.request_timeout_s})")
@click.option("--max-message-bytes", type=int, default=None,
              help=f"largest ZeroMQ message accepted from a client or worker; a larger one drops its "
                   f"sender's connection (default {_D.max_message_bytes})")
@click.option("--max-migrations", type=int, default=None,
              help="times a stream whose generation worker died may continue on another "
                   f"(0 turns migration off; default {_D.max_migrations})")
@click.option("--default-model", default=None, metavar="NAME",
              help="with workers of several models up, the one a request naming none runs on "
                   "(default: the first registered)")
@cluster_options
@_advertise_option
@_http_options
@_auth_options
@log_level_option
def start(frontend, backend, config, heartbeat_interval, liveness, max_queue, kv_lease,
          request_timeout, max_message_bytes, max_migrations, default_model, cluster_uri, cluster_name,
          lease_interval, lease_ttl, advertise_host, http_port, no_http, curve_key, client_keys, worker_keys,
          api_key, log_level) -> None:
    """Run the broker: clients connect to --frontend, workers to --backend. A port of 0 (or *)
    picks a free port; the chosen addresses are printed on the first line of stdout. With an
    etcd:// cluster URI the broker registers its addresses there for workers to find; with a
    tcp:// one it is the backend address."""
    setup_logging(log_level)
    from broker.server import BrokerServer
    over = {"heartbeat_interval_s": heartbeat_interval, "liveness": liveness, "max_queue": max_queue,
            "kv_lease_s": kv_lease, "request_timeout_s": request_timeout,
            "max_message_bytes": max_message_bytes, "max_migrations": max_migrations,
            "default_model": default_model}
    try:
        cfg = load_disagg_config(config) if config else DisaggConfig()
        settings = dataclasses.replace(cfg.broker, **{k: v for k, v in over.items() if v is not None})
        for name in ("context_servers", "generation_servers"):
            group = getattr(cfg, name)
            if group.options or group.extra_llm_api_options:
                logging.getLogger("broker").warning(
                    "%s: %s worker options are not used by `broker start` (it starts no workers): "
                    "`broker launch` passes them, or give them to `worker start "
                    "--extra-llm-api-options`", cfg.source, name)
        a = cfg.auth
        flags = (curve_key, client_keys, worker_keys)
        names = tuple(f"--{n.split('.')[1].replace('_', '-')}" if v or not config else f"{cfg.source}: {n}"
                      for n, v in zip(CONFIG_NAMES, flags))
        curve = broker_curve(curve_key or a.curve_key, client_keys or a.client_keys,
                             worker_keys or a.worker_keys, names)
        if not no_http:
            api_key_from(api_key, a.api_key)        # a bad key fails before anything binds
        cluster = cluster_settings(cfg.cluster, cluster_uri, cluster_name, lease_interval, lease_ttl)
        if cluster.cluster_uri and cluster.cluster_uri.startswith("tcp://"):
            if backend and backend != cluster.cluster_uri:
                raise ConfigError(f"--backend={backend!r} and the cluster URI {cluster.cluster_uri!r} "
                                  "(the broker's own address) disagree")
            backend = cluster.cluster_uri
        server = BrokerServer(frontend or cfg.frontend, backend or cfg.backend_address, settings,
                              curve=curve, minimum=cfg.minimal_instances, routing=cfg.routing)
    except (ConfigError, OSError) as e:
        raise CommandError("broker", str(e)) from None
    gateway = registration = None
    try:
        if not no_http:
            from broker.launch import start_gateway
            models = (cfg.model,) if config else ()
            gateway = start_gateway(cfg, server.frontend, http_port, models, self_client(curve), api_key)
        signal.signal(signal.SIGTERM, lambda *_: server.stop())
        signal.signal(signal.SIGINT, lambda *_: server.stop())
        http = f" http={gateway.gateway.url}" if gateway is not None else ""
        published = broker_published(server.frontend, server.backend,
                                     gateway.gateway.url if gateway is not None else None,
                                     advertise_host, cfg.hostname)
        if published[:2] != (server.frontend, server.backend):
            logging.getLogger("broker").info("advertised at frontend=%s backend=%s http=%s", *published)
        registration = register_broker(cluster, *published)
        print(f"broker ready frontend={server.frontend} backend={server.backend}{http}", flush=True)
        server.run()
    except OSError as e:
        raise CommandError("broker", str(e)) from None
    finally:
        if registration is not None:
            registration.close()
        if gateway is not None:
            gateway.stop()
        server.close()


@cli.command(short_help="run a broker and its workers from a config")
@click.option("-c", "--config", required=True, help="TensorRT-LLM-style disagg_config.yaml")
@click.option("--model", default=None, help="override the config's model: smollm2-135m, tiny, or a path")
@click.option("--demo", is_flag=True,
              help="answer a few built-in chat prompts, print them with timings, then stop")
@click.option("--prompt", multiple=True,
              help="with --demo: a chat prompt to answer instead of the built-in ones (repeatable)")
@click.option("--max-tokens", type=int, default=48, help="with --demo: output tokens per answer (default: 48)")
@click.option("--ready-timeout", type=float, default=600,
              help="seconds to wait for the workers to register (default: 600)")
@_advertise_option
@_http_options
@log_level_option
@click.pass_context
def launch(ctx, config, model, demo, prompt, max_tokens, ready_timeout, advertise_host, http_port, no_http,
           log_level) -> None:
    """Start the broker and, as child processes, the context and generation workers the config's
    num_instances ask for; wait until all are ready; stop them all on Ctrl-C or SIGTERM."""
    setup_logging(log_level)
    from broker.launch import DEMO_PROMPTS, Launch, run_demo
    try:
        cfg = load_disagg_config(config)
        if model:
            cfg = dataclasses.replace(cfg, model=model)
        if demo and http_port is None:
            http_port = 0      # the demo speaks ZeroMQ; never fail on a busy default port for it
        session = Launch(cfg, log_level, http=not no_http, http_port=http_port, advertise_host=advertise_host)
    except (ConfigError, OSError) as e:
        raise CommandError("broker", str(e)) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    rc = 0
    try:
        session.start()
        session.wait_ready(ready_timeout)
        http = f" http={session.http_url}" if session.http_url else ""
        print(f"ready: frontend={session.frontend} backend={session.server.backend} "
              f"model={cfg.model}{http}", flush=True)
        if demo:
            prompts = [[{"role": "user", "content": q}] for q in prompt] or DEMO_PROMPTS
            rc = run_demo(session.frontend, prompts, max_tokens, curve=self_client(session.curve))
        else:
            while not stop.wait(0.5):
                gone = session.children.exited()
                if gone is not None and gone.returncode == 0:    # drained (worker drain, SIGTERM): on purpose
                    print(f"broker launch: {session.children.forget(gone)} drained and left", file=sys.stderr)
                elif gone is not None:
                    print("broker launch: a worker exited; stopping", file=sys.stderr)
                    rc = 1
                    break
    except (RuntimeError, TimeoutError) as e:
        print(f"broker launch: error: {e}", file=sys.stderr)
        rc = 1
    except (ConfigError, OSError) as e:
        raise CommandError("broker", str(e)) from None
    finally:
        session.stop()
    ctx.exit(rc)


@cli.command(short_help="write a CURVE key pair")
@click.option("--dir", "directory", required=True, help="folder to write NAME.key and NAME.key_secret to")
@click.option("--name", required=True, help="file name of the pair: NAME.key (public) and NAME.key_secret")
@click.option("--force", is_flag=True, help="replace an existing pair of that name")
def keygen(directory, name, force) -> None:
    """Write a CURVE key pair as ZeroMQ certificates. Give the public NAME.key to the other side
    (a directory of admitted keys, or --curve-server-key); keep NAME.key_secret (mode 0600)."""
    try:
        public, secret = keygen_files(directory, name, force)
    except (ConfigError, OSError) as e:
        raise CommandError("broker", str(e)) from None
    click.echo(f"public={public} secret={secret}")


def main(argv=None) -> int:
    return run(cli, "broker", argv)


if __name__ == "__main__":
    sys.exit(main())
