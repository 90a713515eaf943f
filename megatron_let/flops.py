"""FLOPs per token, teacher included (the compute-matched accounting of Appendix A.9 of
"hidden-layer distillation, compute-matched"): 6N for the backbone, 6·d·V for the logits
(de-embedding, usually left out of 6ND), attention scores, and — while LET is on — the frozen
teacher's forward pass. The teacher's output head is never run by megatron-let, so it costs
nothing; the embedding lookup is free (a gather, not a matmul).

Backward costs twice the forward for layers with parameters and once for parameter-free ones
(attention scores), as in that paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_let.config import ModelConfig
from megatron_let.model import count_parameters


def _attention_dim(model: ModelConfig) -> int:
    return model.num_attention_heads * (model.kv_channels or model.hidden_size // model.num_attention_heads)


def attention_forward_flops(model: ModelConfig, seq_length: int) -> float:
    """QKᵀ and A·V per token, causal (half the score matrix): 2 matmuls × 2 FLOPs × s/2 × d_attn × L."""
    return 2.0 * seq_length * _attention_dim(model) * model.num_layers


def training_flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Forward + backward of the trained model: 6N + 6·d·V + 2 × attention forward."""
    backbone = count_parameters(model)["non_embedding"]
    logits = model.hidden_size * model.vocab_size
    return 6.0 * backbone + 6.0 * logits + 2.0 * attention_forward_flops(model, seq_length)


def teacher_flops_per_token(teacher: ModelConfig, seq_length: int, layers: int | None = None) -> float:
    """Forward only, up to the aligned layer (all layers for the final hidden state), no head."""
    fraction = 1.0 if layers is None else layers / teacher.num_layers
    backbone = count_parameters(teacher)["non_embedding"]
    return fraction * (2.0 * backbone + attention_forward_flops(teacher, seq_length))


@dataclass
class FlopsCounter:
    """Running total of the FLOPs a run has spent, for compute-matched comparisons."""

    target_per_token: float
    teacher_per_token: float = 0.0
    total: float = 0.0

    def step(self, tokens: int, teacher_active: bool) -> float:
        flops = tokens * (self.target_per_token + (self.teacher_per_token if teacher_active else 0.0))
        self.total += flops
        return flops
