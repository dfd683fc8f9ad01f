#!/usr/bin/env bash
# s2moe-train under the DeepSpeed launcher (one node, or many through a hostfile + passwordless ssh).
#
#   NUM_GPUS=2 bash launch_scripts/deepspeed.sh --config configs/model/tiny.yaml \
#       --deepspeed configs/deepspeed/zero1_fp32.json [--data text8.gz] [more s2moe-train args]
#   HOSTFILE=launch_scripts/hostfile NUM_NODES=2 NUM_GPUS=8 MASTER_PORT=29611 bash launch_scripts/deepspeed.sh ...
#
# NUM_GPUS: processes per node (on a CPU-only machine: CPU ranks, gloo). MASTER_PORT: default a
# free port (single node); required with a hostfile (every node must agree on it).
# DS_LAUNCHER_ARGS: more options for the deepspeed launcher, e.g. "--ssh_port 2222" or
# "--launcher openmpi". With a hostfile the ranks are started over ssh (pdsh) with a bare
# environment: the variables they need (forwarded_vars in common.sh: venv PATH, OMP_NUM_THREADS,
# TORCH_EXTENSIONS_DIR, S2MOE_*, GLOO_*, NCCL_*, ...) go into the file named by DS_ENV_FILE, which
# the launcher exports on every node.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
activate_venv
cd "$S2MOE_ROOT"
args=()
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE" --master_port "$(multi_node_port)")
  [ -n "${MASTER_ADDR:-}" ] && args+=(--master_addr "$MASTER_ADDR")
  [ -n "${NUM_NODES:-}" ] && args+=(--num_nodes "$NUM_NODES")
  env_text="$(for v in $(forwarded_vars); do
    val="${!v}"
    # quoted only where the remote shell needs it (Open MPI's -x takes the value literally)
    if [[ "$val" =~ ^[A-Za-z0-9_./:@%+=,-]*$ ]]; then echo "$v=$val"; else echo "$v=$(printf %q "$val")"; fi
  done)"
  # one file per content, so concurrent launches never rewrite each other's
  DS_ENV_FILE="${TMPDIR:-/tmp}/s2moe-deepspeed-env-$(id -u)-$(printf %s "$env_text" | sha1sum | cut -c1-16)"
  printf '%s\n' "$env_text" > "$DS_ENV_FILE"
  export DS_ENV_FILE
else
  args+=(--master_port "${MASTER_PORT:-$(free_port)}")
fi
args+=(--num_gpus "${NUM_GPUS:-2}")
# shellcheck disable=SC2206  # word splitting wanted: "--ssh_port 2222" -> two arguments
[ -n "${DS_LAUNCHER_ARGS:-}" ] && args+=($DS_LAUNCHER_ARGS)
exec deepspeed "${args[@]}" "$(command -v s2moe-train)" "$@"
