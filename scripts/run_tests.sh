#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up .venv (see setup_env.sh), checks lint and
# formatting (ruff, configured in pyproject.toml), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=$(bash scripts/setup_env.sh)
"$py" -m ruff check .
"$py" -m ruff format --check .
exec "$py" -m pytest -q "$@"
