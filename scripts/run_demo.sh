#!/usr/bin/env bash
# The main job, from a fresh machine: sets up .venv with what it runs (see setup_env.sh), then
# trains a small byte-level GPT with ShardedShampoo (train.py --recommended: the recipe
# docs/benchmarks.md found best) and AdamW on 2 processes (DDP). Extra arguments go to
# scripts/train.py (--help lists them; they override the recipe's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=$(FOR=demo bash scripts/setup_env.sh)
exec "$py" scripts/train.py --recommended "$@"
