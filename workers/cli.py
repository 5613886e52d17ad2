"""``worker start``: run one context, generation or aggregated worker against a broker.

The command line only (click). It imports the worker, the engine and torch only once a worker
really starts, so ``worker --help`` and ``worker start --help`` answer at once.
"""
from __future__ import annotations

import dataclasses
import signal
import sys

import click

from broker.cli import CONTEXT, CommandError, log_level_option, run, setup_logging


@click.group(context_settings=CONTEXT)
def cli() -> None:
    """Workers of the disaggregated server."""


@cli.command(short_help="start a worker and register it with the broker")
@click.option("--role", required=True, type=click.Choice(["context", "generation", "both"]),
              help="context: prefill and hand the KV cache over; generation: pull the KV cache and "
                   "decode; both: serve whole requests (aggregated)")
@click.option("--broker", required=True, metavar="tcp://HOST:PORT",
              help="the broker's backend (worker-facing) address")
@click.option("--model", default="smollm2-135m",
              help="smollm2-135m (embedded default), tiny (seeded test model), a .gguf file, or a "
                   "Hugging Face directory with safetensors and tokenizer.json (default: smollm2-135m)")
@click.option("--extra-llm-api-options", "--extra_llm_api_options", "options", metavar="YAML", default=None,
              help="TensorRT-LLM-style worker options: cache_transceiver_config, kv_cache_config, "
                   "max_batch_size, max_num_tokens, tokens_per_block, dtype, quantization "
                   "(auto|none|fp16|int8), device, ...")
@click.option("--worker-id", default=None, help="name shown in the broker's logs (default: ROLE-HOST-PID)")
@click.option("--host", default="127.0.0.1",
              help="address the KV transfer endpoint binds to, on context workers (default: 127.0.0.1)")
@click.option("--device", default=None, metavar="auto|cpu|cuda|cuda:N",
              help="where the model, KV cache and sampling run (default: the options file's device, "
                   "else auto: cuda:0 where CUDA is present, else cpu)")
@click.option("--exit-with-parent", is_flag=True,
              help="stop when the parent process exits (used by `broker launch`)")
@log_level_option
def start(role, broker, model, options, worker_id, host, device, exit_with_parent, log_level) -> None:
    """Start a worker. It loads the model, connects to the broker's backend address, registers
    its role and capacity, and serves until SIGINT/SIGTERM."""
    setup_logging(log_level)
    from transfer.base import TransferError
    from workers.options import load_options
    from workers.worker import Worker
    try:
        opts = load_options(options)
        if device is not None:
            opts = dataclasses.replace(opts, device=device)
        worker = Worker(role, broker, model, opts, worker_id, host, exit_with_parent=exit_with_parent)
    except (TransferError, ValueError, FileNotFoundError) as e:   # ConfigError is a ValueError
        raise CommandError("worker", str(e)) from None

    def on_signal(signum, frame):
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"worker {worker.worker_id} role={role} model={model} ({worker.precision.describe()}) "
          f"transfer={worker.transfer_info or 'none'}", flush=True)
    worker.run()
    if worker.failure:
        raise CommandError("worker", f"left service: {worker.failure}")


def main(argv=None) -> int:
    return run(cli, "worker", argv)


if __name__ == "__main__":
    sys.exit(main())
