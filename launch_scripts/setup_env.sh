#!/usr/bin/env bash
# Idempotent environment setup for s2moe-dist.
# Makes .venv in the repo (if missing) and installs everything a fresh machine needs.
# torch stays pinned through a constraints file on every install after the first, so
# pip never swaps the CPU build for a multi-GB CUDA one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${S2MOE_VENV:-$ROOT/.venv}"
TORCH_VERSION="${S2MOE_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"
log() { echo "[setup_env] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
pip_q() { python -m pip install --disable-pip-version-check -q "$@"; }

# 1. torch: keep whatever is installed (a GPU machine's CUDA build), else the CPU build.
if python -c "import torch" 2>/dev/null; then
  TORCH_HAVE="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
  log "torch $TORCH_HAVE already installed, keeping it"
else
  log "installing torch==$TORCH_VERSION"
  pip_q "torch==$TORCH_VERSION"
  TORCH_HAVE="$TORCH_VERSION"
fi
# the build decides CPU or GPU training: say which, and refuse a CPU torch on a GPU machine
TORCH_BUILD="$(python -c 'import torch; print("CUDA " + torch.version.cuda if torch.version.cuda else "CPU-only")')"
log "torch build: $TORCH_BUILD"
NGPUS=0
command -v nvidia-smi >/dev/null 2>&1 && NGPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
if [ "$NGPUS" -gt 0 ] && [ "$TORCH_BUILD" = CPU-only ]; then
  log "ERROR: this machine has $NGPUS GPU(s) (nvidia-smi -L) but $VENV has a CPU-only torch $TORCH_HAVE:"
  log "  training would run on the CPU. Install a CUDA build into it, e.g."
  log "  $VENV/bin/pip install --force-reinstall torch==$TORCH_HAVE --index-url https://download.pytorch.org/whl/cu126"
  log "  then rerun this script; or set S2MOE_DEVICE=cpu to keep the CPU build on purpose"
  [ "${S2MOE_DEVICE:-}" = cpu ] || exit 1
fi
CONSTRAINTS="$VENV/s2moe-constraints.txt"
echo "torch==$TORCH_HAVE" > "$CONSTRAINTS"
export PIP_CONSTRAINT="$CONSTRAINTS"

# 2. Debian's Open MPI for mpi4py (optional: skipped where apt is not usable). The two-host tests
# install what else they need themselves (iproute2, openssh-server, pdsh, slurm-wlm, munge).
if ! command -v mpicc >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    log "installing Debian's Open MPI (libopenmpi-dev openmpi-bin)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null) \
      || log "WARNING: could not install Open MPI; mpi4py and mpirun.sh will be unavailable"
  else
    log "WARNING: no mpicc and no root apt-get; skipping Open MPI"
  fi
fi

# 3. The rest. DS_BUILD_OPS=0: DeepSpeed JIT-compiles the few ops it needs at first use.
NEED=""
python -c "import deepspeed" 2>/dev/null || NEED="yes"
python -c "import megatron.core" 2>/dev/null || NEED="yes"
python -c "import tensorboard" 2>/dev/null || NEED="yes"
python -c "import mkdocs, material, mkdocstrings" 2>/dev/null || NEED="yes"
python -m ruff --version >/dev/null 2>&1 || NEED="yes"
python -c "import s2moe_dist" 2>/dev/null || NEED="yes"
if command -v mpicc >/dev/null 2>&1; then python -c "import mpi4py" 2>/dev/null || NEED="yes"; fi
if [ -n "$NEED" ] || [ "${S2MOE_REINSTALL:-0}" = "1" ]; then
  EXTRAS="dev,deepspeed,megatron,train,docs"
  command -v mpicc >/dev/null 2>&1 && EXTRAS="$EXTRAS,mpi"
  log "installing s2moe_dist[$EXTRAS] (editable) with deepspeed, megatron-core, tensorboard"
  DS_BUILD_OPS=0 pip_q -e ".[$EXTRAS]"
else
  log "all packages present"
fi
python - <<'PY'
import torch, deepspeed, megatron.core, tensorboard, s2moe_dist
print(f"[setup_env] ok: torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      f"megatron-core {megatron.core.__version__}, s2moe_dist {s2moe_dist.__version__}")
PY

# 4. DeepSpeed's CPU all-reduce op (deepspeed_shm_comm), JIT-compiled at the first engine start of
# a CPU run: built here once (~40-80 s) into TORCH_EXTENSIONS_DIR, so that no run or test pays for it
# (and several starting at once do not queue on the build lock). Not needed where torch sees a GPU.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
python - <<'PY'
import os, time, torch
if not torch.cuda.is_available():
    from deepspeed.accelerator import get_accelerator
    import deepspeed.ops
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")  # what deepspeed.comm loads on CPU
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        so = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], builder.name, builder.name + ".so")
        if not os.path.exists(so):
            print(f"[setup_env] building DeepSpeed's CPU op {builder.name} once into "
                  f"{os.environ['TORCH_EXTENSIONS_DIR']} (~1 min)", flush=True)
            t0 = time.time()
            builder.load(verbose=False)
            print(f"[setup_env] built {builder.name} in {time.time() - t0:.0f} s", flush=True)
PY
