# Sourced by the launch scripts: venv, project-local caches, a free rendezvous port.
S2MOE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$S2MOE_ROOT/.torch_extensions}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1
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
