#!/usr/bin/env bash
# The README's first command: set up, train the tiny S2MoE character LM on 2 CPU ranks for a few
# minutes, then print where the TensorBoard logs and the checkpoint are and the final BPC at
# k=1 and k=2 (experts per token at inference).
#
#   bash launch_scripts/quickstart.sh                 # the built-in corpus (no download)
#   bash launch_scripts/quickstart.sh text8.gz        # text8 (plain, .gz or .zip); or S2MOE_DATA=...
#
# Knobs: S2MOE_STEPS (default 400), S2MOE_OUTPUT (default runs/quickstart-<date>-<time>).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
T0=$(date +%s)
bash "$HERE/setup_env.sh"
source "$HERE/common.sh"
activate_venv
cd "$S2MOE_ROOT"

DATA="${1:-${S2MOE_DATA:-}}"
STEPS="${S2MOE_STEPS:-400}"
OUT="${S2MOE_OUTPUT:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}"
args=(--config configs/model/tiny.yaml --deepspeed configs/deepspeed/zero1_fp32.json --output "$OUT"
      --set "train.steps=$STEPS" train.eval_every=200 train.ckpt_every=200 train.eval_windows=512)
if [ -n "$DATA" ]; then
  [ -f "$DATA" ] || { echo "quickstart: data file '$DATA' not found" >&2; exit 1; }
  args+=(--data "$DATA")
  echo "[quickstart] training the tiny model on $DATA: 2 CPU ranks, $STEPS steps"
else
  echo "[quickstart] training the tiny model on the built-in corpus: 2 CPU ranks, $STEPS steps"
fi
echo "[quickstart] (DeepSpeed compiles one small op at its first start, ~80 s, cached in $TORCH_EXTENSIONS_DIR)"

torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "$(free_port)" \
  -m s2moe_dist.cli train "${args[@]}"

python - "$OUT" "$(( $(date +%s) - T0 ))" <<'PY'
import json, os, sys
out, secs = os.path.abspath(sys.argv[1]), int(sys.argv[2])
final = json.load(open(os.path.join(out, "final_eval.json")))
print()
print(f"[quickstart] done in {secs // 60} min {secs % 60} s ({final['step']} steps)")
print(f"[quickstart] TensorBoard logs: {final['tensorboard']}")
print(f"[quickstart]     view them:    tensorboard --logdir {final['tensorboard']}")
print(f"[quickstart] checkpoint:       {final['checkpoint']}")
print(f"[quickstart]     evaluate it:  s2moe-eval --checkpoint {out} --eval-k 1 2")
for k, v in final["bpc_valid"].items():
    print(f"[quickstart] final validation BPC k={k}: {v:.3f}")
PY
