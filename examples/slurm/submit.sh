#!/bin/bash
# Submits disagg_serve.slurm (in the role of TensorRT-LLM's submit.sh): sets its DSRV_* variables
# from the options below (each option's default is that variable's, else the one in brackets),
# passes everything after `--` to sbatch, prints the job id, and with --wait waits for the job to
# be serving and prints its endpoints.
#
#   examples/slurm/submit.sh --ctx 2 --gen 2 --nodes 2 --etcd --wait -- --partition=gpu --gres=gpu:4
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
usage() {
    cat <<EOF
usage: $0 [options] [-- sbatch options]
  --ctx N               context workers [1]                          (DSRV_NUM_CTX)
  --gen M               generation workers [1]                       (DSRV_NUM_GEN)
  --model MODEL         the workers' --model [smollm2-135m]          (DSRV_MODEL)
  --nodes K             nodes of the job [1]
  --workers-per-node W  workers placed on each node [an even spread] (DSRV_WORKERS_PER_NODE)
  --cluster-name NAME   namespace of the etcd keys [disagg-JOBID]    (DSRV_CLUSTER_NAME)
  --http-port P         the HTTP gateway's port [8000]               (DSRV_HTTP_PORT)
  --frontend-port P     the broker's client port [5555]              (DSRV_FRONTEND_PORT)
  --backend-port P      the broker's worker port [5556]              (DSRV_BACKEND_PORT)
  --etcd                start etcd on the first node; workers find the broker there (DSRV_ETCD=1)
  --etcd-port P         etcd's client port [2379]; its peer port: --etcd-peer-port [2380]
  --cluster-uri URI     an etcd://HOST:PORT running elsewhere         (DSRV_CLUSTER_URI)
  --ctx-options FILE    context workers' --extra-llm-api-options     (DSRV_CTX_OPTIONS)
  --gen-options FILE    generation workers' --extra-llm-api-options  (DSRV_GEN_OPTIONS)
  --log-dir DIR         logs go to DIR/JOBID/ [./slurm-logs]         (DSRV_LOG_DIR)
  --wait                wait until every worker is registered, then print the endpoints
  --wait-timeout S      how long --wait waits [DSRV_READY_TIMEOUT + 60, i.e. 960]
EOF
}
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
nodes=1 wait=0
while [ $# -gt 0 ]; do
    case "$1" in
        --ctx) export DSRV_NUM_CTX=$2; shift ;;
        --gen) export DSRV_NUM_GEN=$2; shift ;;
        --model) export DSRV_MODEL=$2; shift ;;
        --nodes) nodes=$2; shift ;;
        --workers-per-node) export DSRV_WORKERS_PER_NODE=$2; shift ;;
        --cluster-name) export DSRV_CLUSTER_NAME=$2; shift ;;
        --http-port) export DSRV_HTTP_PORT=$2; shift ;;
        --frontend-port) export DSRV_FRONTEND_PORT=$2; shift ;;
        --backend-port) export DSRV_BACKEND_PORT=$2; shift ;;
        --etcd) export DSRV_ETCD=1 ;;
        --etcd-port) export DSRV_ETCD_PORT=$2; shift ;;
        --etcd-peer-port) export DSRV_ETCD_PEER_PORT=$2; shift ;;
        --cluster-uri) export DSRV_CLUSTER_URI=$2; shift ;;
        --ctx-options) export DSRV_CTX_OPTIONS=$(abspath "$2"); shift ;;
        --gen-options) export DSRV_GEN_OPTIONS=$(abspath "$2"); shift ;;
        --log-dir) export DSRV_LOG_DIR=$(abspath "$2"); shift ;;
        --wait) wait=1 ;;
        --wait-timeout) wait_timeout=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) echo "$0: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
command -v sbatch >/dev/null || { echo "$0: no sbatch on PATH: is this a Slurm login node?" >&2; exit 1; }
export DSRV_HOME=${DSRV_HOME:-$(cd "$here/../.." && pwd)}
export DSRV_LOG_DIR=${DSRV_LOG_DIR:-$PWD/slurm-logs}
mkdir -p "$DSRV_LOG_DIR"
job=$(sbatch --parsable --nodes="$nodes" --output="$DSRV_LOG_DIR/%j.out" "$@" "$here/disagg_serve.slurm")
job=${job%%;*}
echo "job $job: logs in $DSRV_LOG_DIR/$job/ and $DSRV_LOG_DIR/$job.out"
[ "$wait" = 1 ] || exit 0

deadline=$((SECONDS + ${wait_timeout:-$((${DSRV_READY_TIMEOUT:-900} + 60))}))
while [ ! -f "$DSRV_LOG_DIR/$job/endpoints" ]; do
    if ! state=$(squeue -h -j "$job" -o %T 2>&1); then
        case "$state" in *"Invalid job id"*) state="" ;; *) state=UNKNOWN ;; esac     # gone / no answer
    fi
    case "$state" in ""|COMPLETED|CANCELLED*|FAILED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|PREEMPTED|BOOT_FAIL|DEADLINE)
        [ -f "$DSRV_LOG_DIR/$job/endpoints" ] && break
        echo "$0: job $job ended (${state:-gone}) before it was ready:" >&2
        tail -n 30 "$DSRV_LOG_DIR/$job.out" >&2 2>/dev/null || true
        exit 1 ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "$0: job $job ($state) not ready in time; scancel $job to stop it" >&2
        exit 1
    fi
    sleep 1
done
cat "$DSRV_LOG_DIR/$job/endpoints"
