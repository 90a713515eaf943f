"""FLOPs per token, teacher included (the compute-matched accounting of Appendix A.9 of
"hidden-layer distillation, compute-matched"): 6N for the backbone, 6·d·V for the logits
(de-embedding, usually left out of 6ND), attention scores, and — while LET is on — the frozen
teacher's forward pass. The teacher's output head is never run by megatron-let, so it costs
nothing; the embedding lookup is free (a gather, not a matmul).

Backward costs twice the forward for layers with parameters and once for parameter-free ones
(attention scores), as in that paper.

Throughput (TFLOP/s per GPU in the log) is counted as Megatron-LM counts it instead
(:func:`megatron_lm_flops_per_token`), so that figures compare with Megatron-LM's and with MFU
tables: attention scores over the full (not causal-halved) score matrix with backward twice the
forward, SwiGLU as 3/2 of a plain MLP, the logits over the padded vocabulary, norms ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_let.config import ModelConfig
from megatron_let.model.gpt import count_parameters, padded_vocab_size


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


def teacher_flops_per_token(
    teacher: ModelConfig, seq_length: int, layers: int | None = None, *, head: bool = False
) -> float:
    """Forward only, up to the aligned layer (all layers for the final hidden state); ``head``:
    the output layer too (2·d·V, logit distillation)."""
    fraction = 1.0 if layers is None else layers / teacher.num_layers
    backbone = count_parameters(teacher)["non_embedding"]
    flops = fraction * (2.0 * backbone + attention_forward_flops(teacher, seq_length))
    return flops + (2.0 * teacher.hidden_size * teacher.vocab_size if head else 0.0)


def megatron_lm_flops_per_token(
    model: ModelConfig,
    seq_length: int,
    tensor_parallel: int = 1,
    *,
    forward_only: bool = False,
    layers: int | None = None,
    logits: bool = True,
) -> float:
    """Megatron-LM's ``num_floating_point_operations`` per token (its training.py): 12·L·h²·[(1 +
    G/H + s/h)·(H·d_head/h) + (F/h)·(3/2 if SwiGLU)] + 6·h·V_padded — 3 GEMM passes (forward,
    data and weight gradients) × 2 GEMMs per block × 2 FLOPs per multiply-add. Forward only (a
    frozen teacher) is a third of it; ``layers`` counts only the first ones, ``logits`` the head."""
    h, heads = model.hidden_size, model.num_attention_heads
    groups = model.num_query_groups or heads
    query_ratio = heads * (model.kv_channels or h // heads) / h
    ffn = model.ffn_hidden_size or 4 * h
    gated = 1.5 if model.activation == "swiglu" else 1.0
    count = model.num_layers if layers is None else layers
    per_layer = (1 + groups / heads + seq_length / h) * query_ratio + ffn / h * gated
    vocab = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tensor_parallel)
    passes = 1 if forward_only else 3
    return passes * 4 * count * h * h * per_layer + (passes * 2 * h * vocab if logits else 0.0)


@dataclass
class FlopsCounter:
    """Running total of the FLOPs a run has spent (compute-matched accounting), and the per-token
    counts its throughput is reported in (Megatron-LM's formula)."""

    target_per_token: float
    teacher_per_token: float = 0.0
    total: float = 0.0
    target_throughput_per_token: float = 0.0
    teacher_throughput_per_token: float = 0.0

    def throughput_per_token(self, teacher_active: bool) -> float:
        return self.target_throughput_per_token + (self.teacher_throughput_per_token if teacher_active else 0.0)

    def step(self, tokens: int, teacher_active: bool) -> float:
        flops = tokens * (self.target_per_token + (self.teacher_per_token if teacher_active else 0.0))
        self.total += flops
        return flops
