"""FLOPs accounting against a count made another way: the matmuls of a layer, one by one."""

import pytest

from megatron_let.config import ModelConfig
from megatron_let.flops import FlopsCounter, teacher_flops_per_token, training_flops_per_token


def matmul_flops_by_hand(m: ModelConfig, s: int) -> float:
    """Forward FLOPs per token from each weight matrix (2·in·out) plus attention, layer by layer."""
    h, heads = m.hidden_size, m.num_attention_heads
    groups, kv = m.num_query_groups or heads, h // heads
    ffn = m.ffn_hidden_size
    per_layer = 2 * h * (heads + 2 * groups) * kv          # QKV projection
    per_layer += 2 * heads * kv * h                         # output projection
    per_layer += 2 * h * ffn * (2 if m.activation == "swiglu" else 1) + 2 * ffn * h  # MLP
    norms = 2 * h * 2 * m.num_layers + 2 * h                # norm weights count as parameters (6N convention)
    scores = 2 * 2 * (s / 2) * heads * kv                   # causal QKᵀ and A·V
    return m.num_layers * (per_layer + scores) + norms


def test_training_flops_match_a_matmul_by_matmul_count():
    m = ModelConfig(num_layers=24, hidden_size=2048, num_attention_heads=32, ffn_hidden_size=5461,
                    vocab_size=49152)
    s = 1280
    forward = matmul_flops_by_hand(m, s)
    attention = m.num_layers * 2 * 2 * (s / 2) * m.hidden_size
    expected = 3 * (forward - attention) + 2 * attention + 6 * m.hidden_size * m.vocab_size
    assert training_flops_per_token(m, s) == pytest.approx(expected, rel=1e-9)


def test_teacher_costs_a_forward_without_head_and_stops_at_s_stop():
    teacher = ModelConfig(num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3,
                          ffn_hidden_size=1536, vocab_size=49152)
    per_token = teacher_flops_per_token(teacher, 1280)
    assert per_token == pytest.approx(matmul_flops_by_hand(teacher, 1280), rel=1e-9)
    assert teacher_flops_per_token(teacher, 1280, layers=15) == pytest.approx(per_token / 2)
    counter = FlopsCounter(target_per_token=10.0, teacher_per_token=per_token)
    counter.step(100, teacher_active=True)
    counter.step(100, teacher_active=False)
    assert counter.total == pytest.approx(100 * (10.0 + per_token) + 100 * 10.0)
