#!/usr/bin/env python
"""Train a SentencePiece tokenizer on JSONL documents; see megatron_let.data.tokenizer_training."""

import sys

from megatron_let.data.tokenizer_training import main

if __name__ == "__main__":
    sys.exit(main())
