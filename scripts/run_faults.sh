#!/usr/bin/env bash
# The fault scenarios a production job meets, run as tests, and their table: a rank killed
# inside the step, a refresh that raises on one rank (in the step and in the background), a
# save killed midway (synchronous and asynchronous), corrupted and truncated checkpoints, a
# torchft replica group lost between steps, in the step and in the backward. Sets up .venv as
# the test command does; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=$(bash scripts/setup_env.sh)
exec "$py" -m pytest -q -m fault -p fault_report "$@" \
    tests/inputs/test_failures.py tests/state/test_checkpoint.py tests/state/test_checksums.py \
    tests/integrations/test_torchft.py
