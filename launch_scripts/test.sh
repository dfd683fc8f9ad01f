#!/usr/bin/env bash
# Sets up the environment (idempotent), then runs the test suite. Extra args go to pytest.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$HERE/setup_env.sh"
source "$HERE/common.sh"
activate_venv
cd "$S2MOE_ROOT"
set +e
python -m pytest -q -ra --durations=15 tests "$@"
rc=$?
set -e
if [ "$rc" = "5" ]; then echo "test.sh: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
