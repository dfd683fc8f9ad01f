#!/usr/bin/env bash
# Sets up the environment (idempotent), then runs the test suite. Extra args go to pytest (one
# pytest process). With none, the whole suite runs as two pytest processes at once: the cluster
# tests (two hosts, Slurm), which mostly wait on daemons, timeouts and links, beside everything else;
# S2MOE_TEST_LANES=1 runs it as one process instead.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$HERE/setup_env.sh"
source "$HERE/common.sh"
activate_venv
cd "$S2MOE_ROOT"
CLUSTER_FILES=(tests/test_two_hosts.py tests/test_slurm.py)
PYTEST=(python -m pytest -q -ra --durations=15)
set +e
if [ "$#" -gt 0 ] || [ "${S2MOE_TEST_LANES:-2}" = "1" ]; then
  "${PYTEST[@]}" tests "$@"
  rc=$?
else
  lane_log="$(mktemp -t s2moe-cluster-tests.XXXXXX.log)"
  echo "test.sh: the cluster tests (${CLUSTER_FILES[*]}) run beside the rest; their output follows at the end ($lane_log)"
  # their own pytest cache is off: two processes must not write one .pytest_cache at once
  "${PYTEST[@]}" -p no:cacheprovider "${CLUSTER_FILES[@]}" >"$lane_log" 2>&1 &
  lane=$!
  trap 'kill -TERM "$lane" 2>/dev/null' INT TERM
  rest=()
  for f in "${CLUSTER_FILES[@]}"; do rest+=(--ignore="$f"); done
  "${PYTEST[@]}" tests "${rest[@]}"
  rc=$?
  wait "$lane"
  lane_rc=$?
  echo "================================ cluster tests (${CLUSTER_FILES[*]}) ================================"
  cat "$lane_log"
  rm -f "$lane_log"
  echo "test.sh: the rest exited $rc, the cluster tests $lane_rc"
  # pytest's 5 (no tests collected) in one lane is a failure of the whole suite
  [ "$rc" = 0 ] && rc=$lane_rc
  [ "$rc" = 5 ] && rc=1
fi
set -e
if [ "$rc" = "5" ]; then echo "test.sh: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
