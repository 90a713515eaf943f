"""FLOPs accounting against a count made another way: the matmuls of a layer, one by one."""

import pytest

from megatron_let.config import ModelConfig
from megatron_let.flops import FlopsCounter, teacher_flops_per_token, training_flops_per_token


def matmul_flops_by_hand(m: ModelConfig, s: int) -> float:
    """Forward FLOPs per token from each weight matrix (2·in·out) plus attention, layer by layer."""
    h, heads = m.hidden_size, m.num_attention_heads
    groups, kv = m.num_query_groups or heads, h // heads
    ffn = m.ffn_hidden_size
    per_layer = 2 * h * (heads + 2 * groups) * kv  # QKV projection
    per_layer += 2 * heads * kv * h  # output projection
    per_layer += 2 * h * ffn * (2 if m.activation == "swiglu" else 1) + 2 * ffn * h  # MLP
    norms = 2 * h * 2 * m.num_layers + 2 * h  # norm weights count as parameters (6N convention)
    scores = 2 * 2 * (s / 2) * heads * kv  # causal QKᵀ and A·V
    return m.num_layers * (per_layer + scores) + norms


def test_training_flops_match_a_matmul_by_matmul_count():
    m = ModelConfig(num_layers=24, hidden_size=2048, num_attention_heads=32, ffn_hidden_size=5461, vocab_size=49152)
    s = 1280
    forward = matmul_flops_by_hand(m, s)
    attention = m.num_layers * 2 * 2 * (s / 2) * m.hidden_size
    expected = 3 * (forward - attention) + 2 * attention + 6 * m.hidden_size * m.vocab_size
    assert training_flops_per_token(m, s) == pytest.approx(expected, rel=1e-9)


def test_teacher_costs_a_forward_without_head_and_stops_at_s_stop():
    teacher = ModelConfig(
        num_layers=30,
        hidden_size=576,
        num_attention_heads=9,
        num_query_groups=3,
        ffn_hidden_size=1536,
        vocab_size=49152,
    )
    per_token = teacher_flops_per_token(teacher, 1280)
    assert per_token == pytest.approx(matmul_flops_by_hand(teacher, 1280), rel=1e-9)
    assert teacher_flops_per_token(teacher, 1280, layers=15) == pytest.approx(per_token / 2)
    counter = FlopsCounter(target_per_token=10.0, teacher_per_token=per_token)
    counter.step(100, teacher_active=True)
    counter.step(100, teacher_active=False)
    assert counter.total == pytest.approx(100 * (10.0 + per_token) + 100 * 10.0)


def test_throughput_flops_follow_megatron_lm():
    """Megatron-LM's count, made matmul by matmul: every GEMM 3× (forward, data and weight
    gradients), the attention scores over the full s×s matrix (not causal-halved) with their
    backward twice their forward, the logits over the padded vocabulary, norms not counted."""
    from megatron_let.flops import megatron_lm_flops_per_token

    m = ModelConfig(
        num_layers=24,
        hidden_size=2048,
        num_attention_heads=32,
        num_query_groups=8,
        ffn_hidden_size=5632,
        vocab_size=49152,
        activation="swiglu",
    )
    s, tp = 1280, 2
    h, heads, groups, kv = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.hidden_size // 32
    gemms = (
        2 * h * (heads + 2 * groups) * kv
        + 2 * heads * kv * h  # QKV, output projection
        + 2 * h * m.ffn_hidden_size * 2
        + 2 * m.ffn_hidden_size * h
    )  # SwiGLU fc1 (two halves), fc2
    scores = 2 * 2 * s * heads * kv  # QKᵀ and A·V, full matrix
    padded = 49152  # already a multiple of 128 × TP
    expected = 3 * (m.num_layers * (gemms + scores) + 2 * h * padded)
    assert megatron_lm_flops_per_token(m, s, tp) == pytest.approx(expected, rel=1e-12)
    # A frozen teacher: forward only, no head; the first 10 layers of it are a third of 30.
    t = ModelConfig(
        num_layers=30,
        hidden_size=576,
        num_attention_heads=9,
        num_query_groups=3,
        ffn_hidden_size=1536,
        vocab_size=49152,
    )
    full = megatron_lm_flops_per_token(t, s, forward_only=True, logits=False)
    assert megatron_lm_flops_per_token(t, s, forward_only=True, layers=10, logits=False) == pytest.approx(full / 3)
    # The vocabulary is padded as megatron pads it (to a multiple of 128 × TP).
    odd = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=1000)
    with_head = megatron_lm_flops_per_token(odd, 16, 4)
    assert with_head - megatron_lm_flops_per_token(odd, 16, 4, logits=False) == pytest.approx(3 * 2 * 64 * 1024)
