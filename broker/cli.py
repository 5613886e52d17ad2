"""``broker start`` (the broker alone) and ``broker launch`` (broker + workers from a config)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading

from broker.config import BrokerConfig, ConfigError, DisaggConfig, load_disagg_config


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="broker", description="The disaggregated-serving broker.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="run the broker alone",
                       description="Run the broker: clients connect to --frontend, workers to "
                                   "--backend. A port of 0 (or *) picks a free port; the chosen "
                                   "addresses are printed on the first line of stdout.")
    s.add_argument("--frontend", default=None, metavar="tcp://HOST:PORT",
                   help="client-facing address (default tcp://127.0.0.1:0, or the config's)")
    s.add_argument("--backend", default=None, metavar="tcp://HOST:PORT",
                   help="worker-facing address (default tcp://127.0.0.1:0, or the config's)")
    s.add_argument("-c", "--config", help="disagg_config.yaml to take broker settings from")
    d = BrokerConfig()
    s.add_argument("--heartbeat-interval", type=float, default=None,
                   help=f"seconds between heartbeats to workers (default {d.heartbeat_interval_s})")
    s.add_argument("--liveness", type=int, default=None,
                   help=f"missed worker heartbeats before a worker is expired (default {d.liveness})")
    s.add_argument("--max-queue", type=int, default=None,
                   help=f"queued requests past which new ones get OVERLOADED (default {d.max_queue})")
    s.add_argument("--kv-lease", type=float, default=None,
                   help=f"seconds a context worker holds KV waiting for a pull (default {d.kv_lease_s})")
    s.add_argument("--request-timeout", type=float, default=None,
                   help=f"deadline of requests that set none, seconds (default {d.request_timeout_s})")
    _http_args(s)
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log verbosity on stderr (default: INFO)")

    lp = sub.add_parser("launch", help="run a broker and its workers from a config",
                        description="Start the broker and, as child processes, the context and "
                                    "generation workers the config's num_instances ask for; wait "
                                    "until all are ready; stop them all on Ctrl-C or SIGTERM.")
    lp.add_argument("-c", "--config", required=True, help="TensorRT-LLM-style disagg_config.yaml")
    lp.add_argument("--model", help="override the config's model: smollm2-135m, tiny, or a path")
    lp.add_argument("--demo", action="store_true",
                    help="answer a few built-in chat prompts, print them with timings, then stop")
    lp.add_argument("--prompt", action="append", default=[],
                    help="with --demo: a chat prompt to answer instead of the built-in ones (repeatable)")
    lp.add_argument("--max-tokens", type=int, default=48,
                    help="with --demo: output tokens per answer (default: 48)")
    lp.add_argument("--ready-timeout", type=float, default=600,
                    help="seconds to wait for the workers to register (default: 600)")
    _http_args(lp)
    lp.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                    help="log verbosity on stderr (default: INFO)")
    return ap


def _http_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-port", type=int, default=None,
                   help="port of the OpenAI-compatible HTTP gateway; 0 picks a free one "
                        "(default: the config's port, 8000 without a config)")
    p.add_argument("--no-http", action="store_true", help="do not start the HTTP gateway")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _broker_config(args, base: BrokerConfig) -> BrokerConfig:
    over = {"heartbeat_interval_s": args.heartbeat_interval, "liveness": args.liveness,
            "max_queue": args.max_queue, "kv_lease_s": args.kv_lease,
            "request_timeout_s": args.request_timeout}
    return dataclasses.replace(base, **{k: v for k, v in over.items() if v is not None})


def cmd_start(args) -> int:
    from broker.server import BrokerServer
    cfg = load_disagg_config(args.config) if args.config else DisaggConfig()
    server = BrokerServer(args.frontend or cfg.frontend, args.backend or cfg.backend_address,
                          _broker_config(args, cfg.broker))
    gateway = None
    try:
        if not args.no_http:
            from broker.launch import start_gateway
            models = (cfg.model,) if args.config else ()
            gateway = start_gateway(cfg, server.frontend, args.http_port, models)
        signal.signal(signal.SIGTERM, lambda *_: server.stop())
        signal.signal(signal.SIGINT, lambda *_: server.stop())
        http = f" http={gateway.gateway.url}" if gateway is not None else ""
        print(f"broker ready frontend={server.frontend} backend={server.backend}{http}", flush=True)
        server.run()
    finally:
        if gateway is not None:
            gateway.stop()
        server.close()
    return 0


def cmd_launch(args) -> int:
    from broker.launch import DEMO_PROMPTS, Launch, run_demo
    cfg = load_disagg_config(args.config)
    if args.model:
        cfg = dataclasses.replace(cfg, model=args.model)
    http_port = args.http_port
    if args.demo and http_port is None:
        http_port = 0      # the demo speaks ZeroMQ; never fail on a busy default port for it
    launch = Launch(cfg, args.log_level, http=not args.no_http, http_port=http_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    rc = 0
    try:
        launch.start()
        launch.wait_ready(args.ready_timeout)
        http = f" http={launch.http_url}" if launch.http_url else ""
        print(f"ready: frontend={launch.frontend} backend={launch.server.backend} "
              f"model={cfg.model}{http}", flush=True)
        if args.demo:
            prompts = [[{"role": "user", "content": q}] for q in args.prompt] or DEMO_PROMPTS
            rc = run_demo(launch.frontend, prompts, args.max_tokens)
        else:
            while not stop.wait(0.5):
                if any(c.poll() is not None for c in launch.children):
                    print("broker launch: a worker exited; stopping", file=sys.stderr)
                    rc = 1
                    break
    except (RuntimeError, TimeoutError) as e:
        print(f"broker launch: error: {e}", file=sys.stderr)
        rc = 1
    finally:
        launch.stop()
    return rc


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return cmd_start(args) if args.command == "start" else cmd_launch(args)
    except (ConfigError, OSError) as e:
        print(f"broker: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
