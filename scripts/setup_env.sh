#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with sharded_shampoo and what a command needs.
# Run by scripts/run_demo.sh and scripts/run_tests.sh; prints the venv's python on stdout.
#
#   VENV         where the environment lives          (default: .venv in the repo)
#   TORCH_SPEC   what to install when torch is absent (default: torch==2.13.0, the local CPU build;
#                an unpinned "torch" would download a multi-GB CUDA build)
#   FOR          demo: the main job's extra only; tests (the default): the test extra and every
#                framework the tests cover
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
py=$venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  # torch before the package: tensordict needs torch>=2.11, and letting pip resolve torch itself
  # pulls a CUDA build.
  "$py" -m pip install -q "$torch_spec" >&2
fi
for=${FOR:-tests}
case $for in
  demo | tests) ;;
  *) echo "FOR must be demo or tests, got $for" >&2; exit 2 ;;
esac
# Reinstall only when pyproject.toml changed since the last install of this set.
stamp=$venv/.sharded_shampoo-installed-$for
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ] || ! "$py" -c "import sharded_shampoo" >/dev/null 2>&1; then
  if [ "$for" = demo ]; then
    "$py" -m pip install -q -e "$repo[demo]" >&2
  else
    "$py" -m pip install -q -e "$repo[test,hf,lightning,torchft]" >&2
    # The torchtitan extra: torchtitan without its own requirements, then what its trainer
    # imports (see pyproject.toml). The requirements left out on purpose are not reported as
    # conflicts.
    "$py" -m pip install -q --no-warn-conflicts --no-deps "torchtitan==0.3.0" "spmd_types==0.2.3" >&2
    "$py" -m pip install -q --no-warn-conflicts "tyro>=0.9" "torchdata>=0.11" "tensorboard>=2.18" >&2
  fi
  touch "$stamp"
fi
echo "$py"
