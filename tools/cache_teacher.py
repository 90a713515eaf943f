#!/usr/bin/env python
"""Run a teacher once over a run's training samples and store its top-k logits for logit
distillation (``distillation.teacher_cache``); see megatron_let.apps.cache_teacher."""

import sys

from megatron_let.apps.cache_teacher import main

if __name__ == "__main__":
    sys.exit(main())
