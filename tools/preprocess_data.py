#!/usr/bin/env python
"""JSONL → Megatron .bin/.idx, flag-compatible with Megatron-LM's tools/preprocess_data.py;
see megatron_let.preprocess."""

import sys

from megatron_let.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
