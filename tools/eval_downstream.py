#!/usr/bin/env python
"""1-shot downstream scores (paper Table 1) of a Hugging Face model directory; see megatron_let.evaluation.downstream."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_let.evaluation.downstream import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
