#!/usr/bin/env bash
# s2moe-train under torchrun. Single node by default; for several nodes run it on every node with
# NNODES, NODE_RANK, MASTER_ADDR (node 0's address) and the same MASTER_PORT.
#
#   NPROC_PER_NODE=2 bash launch_scripts/torchrun.sh --config configs/model/tiny.yaml \
#       --deepspeed configs/deepspeed/zero1_fp32.json [--data text8.gz] [more s2moe-train args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
activate_venv
cd "$S2MOE_ROOT"
NNODES="${NNODES:-1}"
if [ "$NNODES" = "1" ]; then
  PORT="${MASTER_PORT:-$(free_port)}"
else
  PORT="$(multi_node_port)"
fi
exec torchrun --nnodes "$NNODES" --nproc_per_node "${NPROC_PER_NODE:-2}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$PORT" \
  -m s2moe_dist.cli train "$@"
