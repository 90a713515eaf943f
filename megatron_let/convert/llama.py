"""Llama family (Llama 2/3.x, SmolLM2, ...): RMSNorm, SwiGLU, RoPE, GQA, optional biases.

Llama 3.x RoPE scaling maps onto megatron's ``rope_scaling`` (which fixes low/high frequency
factors 1/4 and 8192 original positions, the values every Llama 3.x uses).
"""

from __future__ import annotations

from megatron_let.convert.mapping import (
    BIASES,
    GATE_UP,
    QKV,
    TIED,
    UNTIED,
    VOCAB,
    Architecture,
    Setting,
    ffn,
    fixed,
    get,
    head_dim,
    hf,
    inverted,
    param,
    query_groups,
    required,
    rope_parameters,
    rotary_base,
    same,
    unsupported,
    unused,
    written,
)

_MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope_to_megatron(c) -> dict:
    rope = rope_parameters(c)
    if float(rope["partial_rotary_factor"]) != 1.0:
        raise unsupported(c, "partial_rotary_factor", rope["partial_rotary_factor"], "Llama rotates whole heads")
    fields = {"rotary_base": rotary_base(c, rope["rope_theta"])}
    if rope["rope_type"] == "default":
        return fields
    if rope["rope_type"] != "llama3":
        raise unsupported(c, "rope_type", rope["rope_type"], "only default and llama3 RoPE convert to megatron")
    for key, expected in _MEGATRON_LLAMA3.items():
        if float(rope.get(key, expected)) != expected:
            raise unsupported(
                c, f"rope {key}", rope[key], f"megatron-core's llama3 RoPE scaling fixes it to {expected:g}"
            )
    return {**fields, "rope_scaling": True, "rope_scaling_factor": float(rope["factor"])}


def _rope_to_hf(m) -> dict:
    params = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    if m.rope_scaling:
        params = {
            "rope_type": "llama3",
            "factor": float(m.rope_scaling_factor),
            **_MEGATRON_LLAMA3,
            "rope_theta": float(m.rotary_base),
        }
    return {"rope_parameters": params}


def _biases_to_megatron(c) -> dict:
    attention, mlp = bool(get(c, "attention_bias", False)), bool(get(c, "mlp_bias", False))
    if attention != mlp:
        raise unsupported(
            c,
            "attention_bias/mlp_bias",
            (attention, mlp),
            "megatron's add_bias_linear puts biases on all linears or none",
        )
    return {"add_bias_linear": attention}


CONFIG = (
    fixed("normalization", "RMSNorm"),
    fixed("activation", "swiglu"),
    fixed("position_embedding_type", "rope"),
    fixed("parallel_residual", False),
    fixed("add_qkv_bias", False, lambda m: not m.add_qkv_bias or m.add_bias_linear),
    fixed("rotary_percent", 1.0),
    required("hidden_act", "silu", "Llama models convert with SwiGLU (silu) only"),
    same("num_hidden_layers", "num_layers"),
    same("hidden_size", "hidden_size"),
    same("num_attention_heads", "num_attention_heads"),
    query_groups(),
    head_dim(),
    ffn("intermediate_size"),
    same("vocab_size", "vocab_size"),
    same("max_position_embeddings", "max_position_embeddings"),
    same("rms_norm_eps", "layernorm_epsilon", float),
    Setting(
        ("rope_parameters",), ("rotary_base", "rope_scaling", "rope_scaling_factor"), _rope_to_megatron, _rope_to_hf
    ),
    Setting(
        ("attention_bias", "mlp_bias"),
        ("add_bias_linear",),
        _biases_to_megatron,
        lambda m: {"attention_bias": m.add_bias_linear, "mlp_bias": m.add_bias_linear},
    ),
    inverted("tie_word_embeddings", "untie_embeddings_and_output_weights", default=False),
    same("initializer_range", "init_method_std", float),
    written("attention_dropout", "attention_dropout"),
    unused("hidden_dropout", "make_vocab_size_divisible_by"),
)

V, H, F = "vocab_size", "hidden_size", "intermediate_size"
Q, KV = "num_attention_heads*head_dim", "num_key_value_heads*head_dim"
L, M = "model.layers.{i}.", "decoder.layers.{i}."

PARAMS = (
    param("embedding.word_embeddings.weight", hf("model.embed_tokens.weight", V, H), transform=VOCAB),
    param(M + "input_layernorm.weight", hf(L + "input_layernorm.weight", H)),
    param(
        M + "self_attention.linear_qkv.weight",
        hf(L + "self_attn.q_proj.weight", Q, H),
        hf(L + "self_attn.k_proj.weight", KV, H),
        hf(L + "self_attn.v_proj.weight", KV, H),
        transform=QKV,
    ),
    param(
        M + "self_attention.linear_qkv.bias",
        hf(L + "self_attn.q_proj.bias", Q),
        hf(L + "self_attn.k_proj.bias", KV),
        hf(L + "self_attn.v_proj.bias", KV),
        transform=QKV,
        when=BIASES,
    ),
    param(M + "self_attention.linear_proj.weight", hf(L + "self_attn.o_proj.weight", H, Q)),
    param(M + "self_attention.linear_proj.bias", hf(L + "self_attn.o_proj.bias", H), when=BIASES),
    param(M + "pre_mlp_layernorm.weight", hf(L + "post_attention_layernorm.weight", H)),
    param(
        M + "mlp.linear_fc1.weight",
        hf(L + "mlp.gate_proj.weight", F, H),
        hf(L + "mlp.up_proj.weight", F, H),
        transform=GATE_UP,
    ),
    param(
        M + "mlp.linear_fc1.bias",
        hf(L + "mlp.gate_proj.bias", F),
        hf(L + "mlp.up_proj.bias", F),
        transform=GATE_UP,
        when=BIASES,
    ),
    param(M + "mlp.linear_fc2.weight", hf(L + "mlp.down_proj.weight", H, F)),
    param(M + "mlp.linear_fc2.bias", hf(L + "mlp.down_proj.bias", H), when=BIASES),
    param("decoder.final_layernorm.weight", hf("model.norm.weight", H)),
    param("output_layer.weight", hf("lm_head.weight", V, H), transform=VOCAB, when=UNTIED),
    param(None, hf("lm_head.weight", V, H), when=TIED),  # a tied copy some checkpoints store
)

ARCHITECTURE = Architecture(
    model_type="llama",
    hf_class="LlamaForCausalLM",
    config_class="LlamaConfig",
    family="Llama-style",
    base_prefix="model.",
    config=CONFIG,
    params=PARAMS,
    ignored=(r"rotary_emb\.inv_freq$",),  # a buffer some old checkpoints saved
)
