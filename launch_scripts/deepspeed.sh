#!/usr/bin/env bash
# s2moe-train under the DeepSpeed launcher (one node, or many through a hostfile + passwordless ssh).
#
#   NUM_GPUS=2 bash launch_scripts/deepspeed.sh --config configs/model/tiny.yaml \
#       --deepspeed configs/deepspeed/zero1_fp32.json [--data text8.gz] [more s2moe-train args]
#   HOSTFILE=launch_scripts/hostfile NUM_NODES=2 NUM_GPUS=8 bash launch_scripts/deepspeed.sh ...
#
# NUM_GPUS: processes per node (on a CPU-only machine: CPU ranks, gloo). MASTER_PORT: default a
# free port (single node); required with a hostfile (every node must agree on it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
activate_venv
cd "$S2MOE_ROOT"
args=()
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE" --master_port "$(multi_node_port)")
  [ -n "${MASTER_ADDR:-}" ] && args+=(--master_addr "$MASTER_ADDR")
  [ -n "${NUM_NODES:-}" ] && args+=(--num_nodes "$NUM_NODES")
else
  args+=(--master_port "${MASTER_PORT:-$(free_port)}")
fi
args+=(--num_gpus "${NUM_GPUS:-2}")
exec deepspeed "${args[@]}" "$(command -v s2moe-train)" "$@"
