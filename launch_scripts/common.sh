# Sourced by the launch scripts: venv, project-local caches, a free rendezvous port.
S2MOE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$S2MOE_ROOT/.torch_extensions}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1
# Megatron tensor parallelism overlaps its communication with compute only when kernels are issued
# in order: one hardware queue per device (harmless without TP)
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
free_port() { "${S2MOE_ROOT}/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
activate_venv() { # shellcheck disable=SC1091
  source "${S2MOE_VENV:-$S2MOE_ROOT/.venv}/bin/activate"; }
# Several nodes must agree on one port that is free on the master host, which this node cannot
# check: ask for it rather than default to a fixed port that other jobs on the nodes may hold.
multi_node_port() {
  if [ -z "${MASTER_PORT:-}" ]; then
    echo "$(basename "$0"): set MASTER_PORT for a multi-node run (a port free on the master host, the same on every node; e.g. MASTER_PORT=\$((20000 + RANDOM % 20000)))" >&2
    exit 2
  fi
  echo "$MASTER_PORT"
}
# The variables every rank on every node needs from this shell (launchers that start ranks over
# ssh pass nothing else): venv, threads, caches, the project's S2MOE_* and the socket/NCCL knobs.
forwarded_vars() {
  local v
  for v in PATH VIRTUAL_ENV LD_LIBRARY_PATH PYTHONPATH PYTHONUNBUFFERED OMP_NUM_THREADS TORCH_EXTENSIONS_DIR \
           CUDA_VISIBLE_DEVICES CUDA_DEVICE_MAX_CONNECTIONS; do
    [ -n "${!v+x}" ] && echo "$v"
  done
  compgen -e | grep -E '^(S2MOE_|GLOO_|NCCL_|TORCH_NCCL_|TORCH_DISTRIBUTED_)' || true
}
