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
launcher=pdsh
ssh_port=''
# shellcheck disable=SC2206
ds_opts=(${DS_LAUNCHER_ARGS:-})
for i in "${!ds_opts[@]}"; do
  case "${ds_opts[$i]}" in
    --launcher) launcher="${ds_opts[$((i + 1))]:-pdsh}" ;;
    --launcher=*) launcher="${ds_opts[$i]#--launcher=}" ;;
    --ssh_port) ssh_port="${ds_opts[$((i + 1))]:-}" ;;
    --ssh_port=*) ssh_port="${ds_opts[$i]#--ssh_port=}" ;;
  esac
done
if [ -z "${HOSTFILE:-}" ] || [ "$launcher" != pdsh ]; then
  exec deepspeed "${args[@]}" "$(command -v s2moe-train)" "$@"
fi

# Multi-node over pdsh. DeepSpeed's runner answers SIGTERM/SIGINT by killing pdsh (the ranks' output
# with it) and `pkill`ing the node launchers, which give the ranks 30 s before SIGKILL, and exits 1
# within seconds, before the ranks have saved. Instead, the first SIGTERM/SIGINT here goes to the ranks
# only (they checkpoint at the next step boundary and exit 0; the runner then ends by itself, with
# status 0); a second one hands over to the runner's own hard stop.
# the nodes the runner starts: the hostfile's, the first NUM_NODES of them, in its order, so that pdsh's
# %n (a node's index in that list) is the --node_rank the runner gave that node's launcher
hosts="$(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$HOSTFILE" | head -n "${NUM_NODES:-100000}" | paste -sd, -)"
node_rank='--node_rank=%n '
[[ " ${DS_LAUNCHER_ARGS:-} " =~ \ (-i|-e|--include|--exclude)[\ =] ]] && node_rank=''  # another list: any rank
port="$(multi_node_port)"
stop_ranks() {
  # the ranks are the children of each node's `python -u -m deepspeed.launcher.launch ... --master_port=PORT`
  # (the port tells this run's launcher from other jobs' on the node)
  local launch="^[^ ]*python[^ ]* -u -m deepspeed[.]launcher[.]launch .*${node_rank}.*--master_port=$port( |\$)"
  PDSH_RCMD_TYPE=ssh PDSH_SSH_ARGS_APPEND="${PDSH_SSH_ARGS_APPEND:-}${ssh_port:+ -p $ssh_port}" \
    pdsh -S -w "$hosts" "pids=\$(pgrep -d, -f '$launch') && pkill -TERM -P \$pids" || true
}
stopping=0
on_signal() {
  if [ "$stopping" = 0 ]; then
    stopping=1
    echo "$(basename "$0"): $1: asking the ranks on $hosts to checkpoint and stop (again: stop at once)" >&2
    stop_ranks
  else
    echo "$(basename "$0"): $1 again: stopping the DeepSpeed runner at once" >&2
    [ -n "$runner" ] && kill -TERM "$runner" 2>/dev/null || true
  fi
}
runner=''
trap 'on_signal SIGTERM' TERM  # before the runner starts (it gets the default handlers back)
trap 'on_signal SIGINT' INT
set -m  # the runner gets its own process group: a Ctrl-C / group signal reaches this script only
deepspeed "${args[@]}" "$(command -v s2moe-train)" "$@" &
runner=$!
set +m
rc=0
while :; do
  wait "$runner" && rc=0 || rc=$?
  kill -0 "$runner" 2>/dev/null || break  # else `wait` was cut short by a trapped signal
done
exit "$rc"
