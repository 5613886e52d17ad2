"""``worker start``: run one context, generation or aggregated worker against a broker."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from transfer.base import TransferError
from transfer.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="worker", description="Workers of the disaggregated server.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "start", help="start a worker and register it with the broker",
        description="Start a worker. It loads the model, connects to the broker's backend address, "
                    "registers its role and capacity, and serves until SIGINT/SIGTERM.")
    s.add_argument("--role", required=True, choices=["context", "generation", "both"],
                   help="context: prefill and hand the KV cache over; generation: pull the KV "
                        "cache and decode; both: serve whole requests (aggregated)")
    s.add_argument("--broker", required=True, metavar="tcp://HOST:PORT",
                   help="the broker's backend (worker-facing) address")
    s.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (embedded default), tiny (seeded test model), a .gguf file, "
                        "or a Hugging Face directory with safetensors and tokenizer.json (default: smollm2-135m)")
    s.add_argument("--extra-llm-api-options", "--extra_llm_api_options", dest="options", metavar="YAML",
                   help="TensorRT-LLM-style worker options: cache_transceiver_config, "
                        "kv_cache_config, max_batch_size, max_num_tokens, tokens_per_block, ...")
    s.add_argument("--worker-id", help="name shown in the broker's logs (default: ROLE-HOST-PID)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address the KV transfer endpoint binds to, on context workers (default: 127.0.0.1)")
    s.add_argument("--exit-with-parent", action="store_true",
                   help="stop when the parent process exits (used by `broker launch`)")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log verbosity on stderr (default: INFO)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from workers.options import load_options
    from workers.worker import Worker
    try:
        opts = load_options(args.options)
        worker = Worker(args.role, args.broker, args.model, opts, args.worker_id, args.host,
                        exit_with_parent=args.exit_with_parent)
    except (ConfigError, TransferError, ValueError, FileNotFoundError) as e:
        print(f"worker: error: {e}", file=sys.stderr)
        return 2

    def on_signal(signum, frame):
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"worker {worker.worker_id} role={args.role} model={args.model} "
          f"transfer={worker.transfer_info or 'none'}", flush=True)
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
