#!/usr/bin/env bash
# s2moe-train under Open MPI's mpirun: ranks come from MPI (DeepSpeed's MPI discovery, mpi4py);
# rank 0's address is broadcast, the rendezvous port is exported to every rank.
#
#   NP=2 bash launch_scripts/mpirun.sh --config configs/model/tiny.yaml \
#       --deepspeed configs/deepspeed/zero1_fp32.json [--data text8.gz] [more s2moe-train args]
#   NP=16 HOSTFILE=launch_scripts/hostfile bash launch_scripts/mpirun.sh ...
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
activate_venv
cd "$S2MOE_ROOT"
command -v mpirun >/dev/null || { echo "mpirun.sh: no mpirun on PATH (bash launch_scripts/setup_env.sh installs Open MPI)" >&2; exit 1; }
args=(-np "${NP:-2}" --bind-to none)
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE")
  PORT="$(multi_node_port)"
else
  args+=(--oversubscribe)
  PORT="${MASTER_PORT:-$(free_port)}"
fi
[ "$(id -u)" = "0" ] && args+=(--allow-run-as-root)
export MASTER_PORT="$PORT"
for v in MASTER_PORT $(forwarded_vars); do  # S2MOE_*, GLOO_*, NCCL_*, venv, threads (common.sh)
  args+=(-x "$v")
done
exec mpirun "${args[@]}" python -m s2moe_dist.cli train "$@"
