#!/usr/bin/env python
"""Baseline vs LET step time, throughput and peak memory (the LET paper's Table 4); see megatron_let.apps.benchmark."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_let.apps.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
