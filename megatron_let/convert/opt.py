"""OPT: learned absolute positions, ReLU MLP, LayerNorm with bias, biases on linears, tied head.

OPT looks positions up at ``position + 2`` (a fairseq padding offset); megatron at ``position``:
megatron row p = OPT row p + 2 (``Offset(2)``; an import keeps the two front rows in the
checkpoint's record so that an export gives them back). Post-norm OPT (``do_layer_norm_before=False``,
OPT-350m) and projected embeddings (``word_embed_proj_dim != hidden_size``) have no megatron
equivalent and are refused. OPT's LayerNorm epsilon is torch's default, 1e-5.
"""

from __future__ import annotations

from megatron_let.convert.mapping import (
    BIASES,
    QKV,
    TIED,
    UNTIED,
    VOCAB,
    Architecture,
    Constant,
    Offset,
    Setting,
    choice,
    ffn,
    fixed,
    get,
    hf,
    hf_flag,
    inverted,
    param,
    plain_heads,
    required,
    same,
    unsupported,
    unused,
    written,
)


def _projection_to_megatron(c) -> dict:
    projection = get(c, "word_embed_proj_dim", c.hidden_size)
    if projection != c.hidden_size:
        raise unsupported(
            c,
            "word_embed_proj_dim",
            projection,
            f"differs from hidden_size={c.hidden_size} (project_in/project_out have no megatron equivalent)",
        )
    return {}


CONFIG = (
    fixed("normalization", "LayerNorm"),
    fixed("position_embedding_type", "learned_absolute"),
    fixed("parallel_residual", False),
    fixed("layernorm_epsilon", 1e-5),
    fixed("add_qkv_bias", False, lambda m: not m.add_qkv_bias or m.add_bias_linear),
    *plain_heads(),
    required("do_layer_norm_before", True, "post-norm OPT has no megatron equivalent"),
    required("_remove_final_layer_norm", False, "megatron always applies a final norm"),
    Setting(("word_embed_proj_dim",), (), _projection_to_megatron, lambda m: {"word_embed_proj_dim": m.hidden_size}),
    choice("activation_function", "activation", {"relu": "relu", "gelu": "gelu"}),
    same("num_hidden_layers", "num_layers"),
    same("hidden_size", "hidden_size"),
    same("num_attention_heads", "num_attention_heads"),
    ffn("ffn_dim"),
    same("vocab_size", "vocab_size"),
    same("max_position_embeddings", "max_position_embeddings"),
    same("enable_bias", "add_bias_linear", bool),
    # Read on import (a norm without parameters converts as weight 1, bias 0); exports have parameters.
    Setting(("layer_norm_elementwise_affine",), (), lambda c: {}, lambda m: {"layer_norm_elementwise_affine": True}),
    inverted("tie_word_embeddings", "untie_embeddings_and_output_weights", default=True),
    same("init_std", "init_method_std", float),
    written("dropout", "hidden_dropout"),
    written("attention_dropout", "attention_dropout"),
    unused(
        "rotary_base",
        "rotary_percent",
        "rope_scaling",
        "rope_scaling_factor",  # no RoPE
        "make_vocab_size_divisible_by",
    ),
)

V, H, F = "vocab_size", "hidden_size", "ffn_dim"
L, M = "model.decoder.layers.{i}.", "decoder.layers.{i}."
AFFINE, CONSTANT = hf_flag("layer_norm_elementwise_affine"), hf_flag("layer_norm_elementwise_affine", expected=False)


def _linear(megatron: str, hf_name: str, *shape: str):
    return (
        param(M + megatron + ".weight", hf(L + hf_name + ".weight", *shape)),
        param(M + megatron + ".bias", hf(L + hf_name + ".bias", shape[0]), when=BIASES),
    )


def _norm(megatron: str, hf_name: str):
    return (
        param(megatron + ".weight", hf(hf_name + ".weight", H), when=AFFINE),
        param(megatron + ".bias", hf(hf_name + ".bias", H), when=AFFINE),
        param(megatron + ".weight", transform=Constant(1.0), when=CONSTANT),
        param(megatron + ".bias", transform=Constant(0.0), when=CONSTANT),
    )


PARAMS = (
    param("embedding.word_embeddings.weight", hf("model.decoder.embed_tokens.weight", V, H), transform=VOCAB),
    param(
        "embedding.position_embeddings.weight",
        hf("model.decoder.embed_positions.weight", "max_position_embeddings+2", H),
        transform=Offset(2),
    ),
    *_norm(M + "input_layernorm", L + "self_attn_layer_norm"),
    param(
        M + "self_attention.linear_qkv.weight",
        hf(L + "self_attn.q_proj.weight", H, H),
        hf(L + "self_attn.k_proj.weight", H, H),
        hf(L + "self_attn.v_proj.weight", H, H),
        transform=QKV,
    ),
    param(
        M + "self_attention.linear_qkv.bias",
        hf(L + "self_attn.q_proj.bias", H),
        hf(L + "self_attn.k_proj.bias", H),
        hf(L + "self_attn.v_proj.bias", H),
        transform=QKV,
        when=BIASES,
    ),
    *_linear("self_attention.linear_proj", "self_attn.out_proj", H, H),
    *_norm(M + "pre_mlp_layernorm", L + "final_layer_norm"),
    *_linear("mlp.linear_fc1", "fc1", F, H),
    *_linear("mlp.linear_fc2", "fc2", H, F),
    *_norm("decoder.final_layernorm", "model.decoder.final_layer_norm"),
    param("output_layer.weight", hf("lm_head.weight", V, H), transform=VOCAB, when=UNTIED),
    param(None, hf("lm_head.weight", V, H), when=TIED),
)

ARCHITECTURE = Architecture(
    model_type="opt",
    hf_class="OPTForCausalLM",
    config_class="OPTConfig",
    family="OPT-style",
    base_prefix="model.",
    config=CONFIG,
    params=PARAMS,
)
