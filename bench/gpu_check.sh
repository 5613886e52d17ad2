#!/usr/bin/env bash
# One short run of everything that needs a GPU, for a machine lent with one (CI has none):
# the GPU tests (engine on CUDA, disaggregated = aggregated on the GPU over NIXL VRAM and UCX CUDA,
# transfers of CUDA pools), then a GPU decode benchmark and a GPU KV transfer benchmark.
# Everything it prints, and its JSON, goes under ${OUT:-/tmp/gpu_check}.
#   bash bench/gpu_check.sh            # after `bash install.sh`
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
status=0
timeout 420 "$PY" -m pytest -q -rs tests/test_engine_gpu.py tests/test_transfer_gpu.py 2>&1 | tee "$OUT/tests.txt" || status=1
timeout 240 "$PY" -m bench.engine --device cuda:0 --configs bfloat16:none,float16:none --no-peer \
    --threads 1 --batches 1,16,64,256 --rounds 3 --json "$OUT/engine.json" 2>&1 | tee "$OUT/engine.txt" || status=1
timeout 240 "$PY" -m bench.transfer --quick --device cuda --kv-dtype bfloat16 --out "$OUT/transfer.json" 2>&1 | tee "$OUT/transfer.txt" || status=1
exit $status
