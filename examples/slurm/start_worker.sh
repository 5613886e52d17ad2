#!/bin/bash
# One worker, as a task of disagg_serve.slurm:
#   start_worker.sh HEAD_ADDR PYTHON WORKER-START-ARGS...
# It advertises this node's address on the network that reaches HEAD_ADDR (its KV transfer
# endpoints, through `worker start --host`; DSRV_WORKER_HOST overrides it) and, with
# DSRV_DEVICE=auto (the default) on a node with GPUs, takes GPU number DSRV_SLOT (its place on
# this node) of the node's GPUs ($CUDA_VISIBLE_DEVICES where Slurm set it, else nvidia-smi's).
set -euo pipefail
head_addr=$1 python=$2
shift 2
host=${DSRV_WORKER_HOST:-$("$python" -c 'import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.connect((sys.argv[1], 9))       # UDP: picks the route, sends nothing
    print(s.getsockname()[0])' "$head_addr")}
device=()
if [ "${DSRV_DEVICE:-auto}" != auto ]; then
    device=(--device "$DSRV_DEVICE")
else
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES}" != NoDevFiles ]; then
        IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
    else
        mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null |
                            grep -E '^[0-9]+$' || true)
    fi
    if [ "${#gpus[@]}" -gt 0 ]; then
        slot=${DSRV_SLOT:-0}
        [ "$slot" -lt "${#gpus[@]}" ] ||
            echo "start_worker: slot $slot but ${#gpus[@]} GPU(s) on $(hostname):" \
                "sharing GPU $((slot % ${#gpus[@]}))" >&2
        export CUDA_VISIBLE_DEVICES=${gpus[$((slot % ${#gpus[@]}))]}    # the worker's auto device: cuda:0
    fi
fi
echo "start_worker: $(hostname) host=$host" \
    "${CUDA_VISIBLE_DEVICES:+CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES }$*" >&2
exec "$python" -m workers.cli start --host "$host" "${device[@]}" "$@"
