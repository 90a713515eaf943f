#!/usr/bin/env python
"""JSONL → Megatron .bin/.idx, flag-compatible with Megatron-LM's tools/preprocess_data.py;
see megatron_let.data.preprocess."""

import sys

from megatron_let.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
