"""megatron-let: Late-to-Early Training (LET) on NVIDIA megatron-core.

A large GPT's early layer k is aligned with a small frozen teacher's final hidden states during
the first S_stop steps of pretraining, under any tensor × pipeline × data parallel layout.
"""

import warnings as _warnings

# megatron-core warns on import when neither Transformer Engine nor Apex is present (always true
# in the CPU mode); say it once in our own setup line instead.
_warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex).*")
# Deprecation chatter from megatron-core 0.16's own internals (cuda-graph scope names, torch's
# ShardedTensor in dist-checkpointing), not actionable by users.
_warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core\.transformer")
_warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(load_state_dict|ShardedTensor).*")

__version__ = "0.1.0"
