"""GPT-NeoX (Pythia): LayerNorm with bias, GeLU MLP, biases on linears, partial rotary
(``partial_rotary_factor``, formerly ``rotary_pct``), untied ``embed_out``, and usually the
parallel residual ``x + attn(ln1(x)) + mlp(ln2(x))`` (megatron_let.model.layers.ParallelResidualTransformerLayer).

The fused ``query_key_value`` holds, per head, [q; k; v]: megatron's layout with one query head
per group, so it is the same tensor both ways.
"""

from __future__ import annotations

from megatron_let.convert.mapping import (
    PER_HEAD_QKV,
    TIED,
    UNTIED,
    VOCAB,
    Architecture,
    Setting,
    choice,
    ffn,
    fixed,
    hf,
    inverted,
    param,
    plain_heads,
    required,
    rope_parameters,
    rotary_base,
    same,
    unsupported,
    unused,
    written,
)


def _rope_to_megatron(c) -> dict:
    rope = rope_parameters(c)
    if rope["rope_type"] != "default":
        raise unsupported(c, "rope_type", rope["rope_type"], "GPT-NeoX converts with plain RoPE only")
    return {"rotary_base": rotary_base(c, rope["rope_theta"]), "rotary_percent": float(rope["partial_rotary_factor"])}


def _rope_to_hf(m) -> dict:
    return {
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(m.rotary_base),
            "partial_rotary_factor": float(m.rotary_percent),
        }
    }


CONFIG = (
    fixed("normalization", "LayerNorm"),
    fixed("position_embedding_type", "rope"),
    fixed("add_bias_linear", True),
    fixed("rope_scaling", False),
    *plain_heads(),
    required("attention_bias", True, "GPT-NeoX's MLP keeps its biases; megatron's add_bias_linear is all or none"),
    choice("hidden_act", "activation", {"gelu": "gelu", "relu": "relu"}),
    same("num_hidden_layers", "num_layers"),
    same("hidden_size", "hidden_size"),
    same("num_attention_heads", "num_attention_heads"),
    ffn("intermediate_size"),
    same("vocab_size", "vocab_size"),
    same("max_position_embeddings", "max_position_embeddings"),
    same("layer_norm_eps", "layernorm_epsilon", float),
    Setting(("rope_parameters",), ("rotary_base", "rotary_percent"), _rope_to_megatron, _rope_to_hf),
    same("use_parallel_residual", "parallel_residual", bool),
    inverted("tie_word_embeddings", "untie_embeddings_and_output_weights", default=False),
    same("initializer_range", "init_method_std", float),
    written("hidden_dropout", "hidden_dropout"),
    written("attention_dropout", "attention_dropout"),
    unused(
        "add_qkv_bias",  # biases are everywhere already
        "rope_scaling_factor",
        "make_vocab_size_divisible_by",
    ),
)

V, H, F = "vocab_size", "hidden_size", "intermediate_size"
L, M = "gpt_neox.layers.{i}.", "decoder.layers.{i}."

PARAMS = (
    param("embedding.word_embeddings.weight", hf("gpt_neox.embed_in.weight", V, H), transform=VOCAB),
    param(M + "input_layernorm.weight", hf(L + "input_layernorm.weight", H)),
    param(M + "input_layernorm.bias", hf(L + "input_layernorm.bias", H)),
    param(
        M + "self_attention.linear_qkv.weight",
        hf(L + "attention.query_key_value.weight", "3*hidden_size", H),
        transform=PER_HEAD_QKV,
    ),
    param(
        M + "self_attention.linear_qkv.bias",
        hf(L + "attention.query_key_value.bias", "3*hidden_size"),
        transform=PER_HEAD_QKV,
    ),
    param(M + "self_attention.linear_proj.weight", hf(L + "attention.dense.weight", H, H)),
    param(M + "self_attention.linear_proj.bias", hf(L + "attention.dense.bias", H)),
    param(M + "pre_mlp_layernorm.weight", hf(L + "post_attention_layernorm.weight", H)),
    param(M + "pre_mlp_layernorm.bias", hf(L + "post_attention_layernorm.bias", H)),
    param(M + "mlp.linear_fc1.weight", hf(L + "mlp.dense_h_to_4h.weight", F, H)),
    param(M + "mlp.linear_fc1.bias", hf(L + "mlp.dense_h_to_4h.bias", F)),
    param(M + "mlp.linear_fc2.weight", hf(L + "mlp.dense_4h_to_h.weight", H, F)),
    param(M + "mlp.linear_fc2.bias", hf(L + "mlp.dense_4h_to_h.bias", H)),
    param("decoder.final_layernorm.weight", hf("gpt_neox.final_layer_norm.weight", H)),
    param("decoder.final_layernorm.bias", hf("gpt_neox.final_layer_norm.bias", H)),
    param("output_layer.weight", hf("embed_out.weight", V, H), transform=VOCAB, when=UNTIED),
    param(None, hf("embed_out.weight", V, H), when=TIED),
)

ARCHITECTURE = Architecture(
    model_type="gpt_neox",
    hf_class="GPTNeoXForCausalLM",
    config_class="GPTNeoXConfig",
    family="GPT-NeoX-style",
    base_prefix="gpt_neox.",
    config=CONFIG,
    params=PARAMS,
    # Buffers old checkpoints saved: the causal mask, its fill value and RoPE frequencies.
    ignored=(r"attention\.bias$", r"attention\.masked_bias$", r"rotary_emb\.inv_freq$"),
)
