"""The TensorRT-LLM configuration keys we accept but do not honour, each with the reason it is
logged once at startup (``log_not_supported``): the ``*_NOT_SUPPORTED`` tables that
``broker/config.py`` and ``workers/options.py`` read. Standard library only."""
from __future__ import annotations

import logging

log = logging.getLogger("broker.config")

# TensorRT-LLM's LLM-API keys first: the worker's extra options YAML and the per-group keys of
# disagg_config.yaml share them.

def _reasons(table: dict) -> dict:
    return {key: reason for reason, keys in table.items() for key in keys.split()}


WORKER_NOT_SUPPORTED = _reasons({
    "there is one worker process per model copy; no tensor, pipeline, context or expert parallelism":
        "tensor_parallel_size pipeline_parallel_size context_parallel_size moe_expert_parallel_size "
        "moe_tensor_parallel_size moe_config enable_attention_dp attention_dp_config gpus_per_node "
        "allreduce_strategy",
    "specific to TensorRT-LLM's runtime (CUDA graphs, torch.compile, autotuning, attention kernels)":
        "backend cuda_graph_config use_cuda_graph pytorch_backend_config "
        "enable_autotuner attn_backend enable_layerwise_nvtx_marker",
    "this engine never overlaps scheduling with the forward pass": "disable_overlap_scheduler",
    "prefill is always chunked here, in chunks of max_num_tokens": "enable_chunked_prefill",
    "the worker's scheduler is fixed (admit by free slots and KV blocks, one decode batch per step, "
    "tokens streamed every step)":
        "scheduler_config batch_wait_timeout_ms stream_interval num_postprocess_workers",
    "per-iteration statistics are not collected; the broker's /metrics has the request metrics":
        "print_iter_log enable_iter_perf_stats return_perf_metrics iter_stats_max_iterations "
        "request_stats_max_iterations",
    "models load through this project's own GGUF and safetensors loaders":
        "trust_remote_code load_format checkpoint_format model_kwargs",
    "the sampler has no beam search, speculation or guided decoding":
        "max_beam_width speculative_config guided_decoding_backend sampler_type enable_mixed_sampler",
    "prompts are bounded by max_seq_len and kv_cache_config.max_tokens": "max_input_len",
    "the KV pool is sized by kv_cache_config.max_tokens, not by a fraction of GPU memory":
        "free_gpu_memory_fraction",
})
KV_NOT_SUPPORTED = _reasons({
    "the KV pool is sized by kv_cache_config.max_tokens and free_gpu_memory_fraction only":
        "max_gpu_total_bytes cross_kv_cache_fraction",
    "prefix reuse shares whole blocks only (enable_block_reuse); a partly matching block is "
    "recomputed": "enable_partial_reuse copy_on_partial_reuse",
    "there is no host offload of KV blocks": "host_cache_size onboard_blocks secondary_offload_min_priority use_uvm",
    "attention always spans the whole sequence (no sliding window or sink tokens)":
        "max_attention_window sink_token_length",
    "KV events go to the broker with the worker's own messages, never buffered for an HTTP "
    "endpoint": "event_buffer_max_size",
})
DISAGG_NOT_SUPPORTED = _reasons({
    "the broker retries a prefill up to broker.max_attempts times": "max_retries",
    "the gateway's /perf_metrics always has per-request timings (perf_metrics_max_requests of them); "
    "they are never written to files": "return_perf_metrics perf_metrics_output_dir",
    "there is no tracing export": "otlp_config",
    "the gateway always applies the model's chat template and sends the whole conversation":
        "allow_request_chat_template gen_strip_message_history gen_tokids_ctxbytes",
    "the broker is one process; there is no coordinator and node ids are not used":
        "node_id num_workers disagg_coordinator_url",
})
# torch_compile_config (TensorRT-LLM's TorchCompileConfig): its presence compiles the decode step
# (workers/engine/compiled.py); enable_fullgraph and capture_num_tokens are honoured
TORCH_COMPILE_NOT_SUPPORTED = _reasons({
    "CUDA graphs, user buffers and CUDA streams are TensorRT-LLM's GPU runtime; this engine "
    "compiles the decode step with inductor only":
        "enable_piecewise_cuda_graph enable_userbuffers max_num_streams",
})
# enable_inductor: false is the one value not honoured (a notice only then)
NO_INDUCTOR = ("decode always compiles with inductor: on the CPU no other torch.compile backend "
               "fuses the step's small ops, which is all compiling buys")
GROUP_NOT_SUPPORTED = {
    "urls": "broker launch starts num_instances workers on this host and each registers with the "
            "broker itself; urls are not used",
}


def log_not_supported(where: str, key: str, reason: str, logger: logging.Logger = log) -> None:
    """The one line a key we accept but do not honour gets at startup."""
    logger.warning("%s: %s is not supported here and is ignored: %s", where, key, reason)
