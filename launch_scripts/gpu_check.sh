#!/usr/bin/env bash
# The GPU path end to end on one GPU in at most 7 minutes, no network needed: torch/CUDA build and
# grouped_mm's fast path, the layer on GPU against CPU in every mode, host syncs per file:line,
# the project's collectives on NCCL, EP=2 against EP=1 on the one GPU, layer step times against
# DeepSpeed MoE top-2 with the GPU-busy fraction, and s2moe-train + resume + s2moe-eval in bf16.
# One PASS/FAIL/SKIP line per check; exit status 1 on any FAIL (2: no GPU without --dry-run).
#
#   bash launch_scripts/gpu_check.sh                  # on a GPU machine
#   bash launch_scripts/gpu_check.sh --dry-run        # the same code on CPU (~2 minutes; CI)
#   bash launch_scripts/gpu_check.sh --out DIR        # summary.md / summary.json there (default $OUT or gpu_check_out/)
#   bash launch_scripts/gpu_check.sh --only layer_parity sync_census
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/common.sh"
# the project's venv where there is one; else the python on PATH (S2MOE_PYTHON to choose)
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "${S2MOE_VENV:-$S2MOE_ROOT/.venv}/bin/activate" ]; then activate_venv; fi
PY="${S2MOE_PYTHON:-$(command -v python || command -v python3)}"
cd "$S2MOE_ROOT"
export PYTHONPATH="$S2MOE_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# a hard stop a little above the script's own 420 s budget: a hung check cannot hold the GPU
exec timeout --signal=TERM --kill-after=15 "${S2MOE_GPU_CHECK_TIMEOUT_S:-450}" \
  "$PY" "$S2MOE_ROOT/benchmarks/gpu_check.py" "$@"
