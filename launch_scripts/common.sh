# Sourced by the launch scripts: venv, project-local caches, a free rendezvous port.
S2MOE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$S2MOE_ROOT/.torch_extensions}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1
free_port() { "${S2MOE_ROOT}/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
activate_venv() { # shellcheck disable=SC1091
  source "${S2MOE_VENV:-$S2MOE_ROOT/.venv}/bin/activate"; }
