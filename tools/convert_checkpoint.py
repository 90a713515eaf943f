"""Hugging Face ↔ megatron-let checkpoints: ``python tools/convert_checkpoint.py import|export ...``
(the same as ``megatron-let convert``)."""

import sys

from megatron_let.convert import main

if __name__ == "__main__":  # the dist-checkpoint writer's workers re-import __main__
    sys.exit(main(sys.argv[1:]))
