"""Llama family (Llama 2/3.x, SmolLM2, ...): RMSNorm, SwiGLU, RoPE, GQA, no biases.

Import and export. Llama 3.x RoPE scaling maps onto megatron's ``rope_scaling`` (which fixes
low/high frequency factors 1/4 and 8192 original positions, the values every Llama 3.x uses).
"""

from __future__ import annotations

import torch

from megatron_let.config import ModelConfig
from megatron_let.convert.common import (
    ConversionError,
    HFWeights,
    fuse_gate_up,
    fuse_qkv,
    rope_settings,
    rotary_base,
    split_qkv,
    unsupported,
)

MODEL_TYPES = ("llama",)
BASE_PREFIX = "model."
IGNORED = (r"rotary_emb\.inv_freq$",)  # a buffer some old checkpoints saved

_MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def model_config(hf) -> ModelConfig:
    if hf.hidden_act != "silu":
        raise unsupported(hf, "hidden_act", hf.hidden_act, "Llama models convert with SwiGLU (silu) only")
    attention_bias = bool(getattr(hf, "attention_bias", False))
    mlp_bias = bool(getattr(hf, "mlp_bias", False))
    if attention_bias != mlp_bias:
        raise unsupported(hf, "attention_bias/mlp_bias", (attention_bias, mlp_bias),
                          "megatron's add_bias_linear puts biases on all linears or none")
    rope = rope_settings(hf)
    if float(rope["partial_rotary_factor"]) != 1.0:
        raise unsupported(hf, "partial_rotary_factor", rope["partial_rotary_factor"], "Llama rotates whole heads")
    rope_scaling, factor = _rope_scaling(hf, rope)
    heads = hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    return ModelConfig(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=heads,
        num_query_groups=kv_heads if kv_heads != heads else None,
        ffn_hidden_size=hf.intermediate_size,
        kv_channels=head_dim if head_dim * heads != hf.hidden_size else None,
        vocab_size=hf.vocab_size,
        max_position_embeddings=hf.max_position_embeddings,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.rms_norm_eps),
        activation="swiglu",
        position_embedding_type="rope",
        rotary_base=rotary_base(hf, rope["rope_theta"]),
        rope_scaling=rope_scaling,
        rope_scaling_factor=factor,
        add_bias_linear=attention_bias,
        untie_embeddings_and_output_weights=not getattr(hf, "tie_word_embeddings", False),
        init_method_std=float(getattr(hf, "initializer_range", 0.02)),
    )


def _rope_scaling(hf, rope: dict) -> tuple[bool, float]:
    kind = rope["rope_type"]
    if kind == "default":
        return False, 8.0
    if kind != "llama3":
        raise unsupported(hf, "rope_type", kind, "only default and llama3 RoPE convert to megatron")
    for key, expected in _MEGATRON_LLAMA3.items():
        if float(rope.get(key, expected)) != expected:
            raise unsupported(hf, f"rope {key}", rope[key],
                              f"megatron-core's llama3 RoPE scaling fixes it to {expected:g}")
    return True, float(rope["factor"])


def to_megatron(hf, model: ModelConfig, weights: HFWeights) -> dict[str, torch.Tensor]:
    groups = model.num_query_groups or model.num_attention_heads
    state = {"embedding.word_embeddings.weight": weights.take("model.embed_tokens.weight")}
    for i in range(model.num_layers):
        hf_layer, layer = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn, mlp = hf_layer + "self_attn.", hf_layer + "mlp."
        suffixes = ("weight", "bias") if model.add_bias_linear else ("weight",)
        for suffix in suffixes:
            state[layer + f"self_attention.linear_qkv.{suffix}"] = fuse_qkv(
                *(weights.take(f"{attn}{p}_proj.{suffix}") for p in "qkv"), groups)
            state[layer + f"self_attention.linear_proj.{suffix}"] = weights.take(f"{attn}o_proj.{suffix}")
            state[layer + f"mlp.linear_fc1.{suffix}"] = fuse_gate_up(
                weights.take(f"{mlp}gate_proj.{suffix}"), weights.take(f"{mlp}up_proj.{suffix}"))
            state[layer + f"mlp.linear_fc2.{suffix}"] = weights.take(f"{mlp}down_proj.{suffix}")
        state[layer + "input_layernorm.weight"] = weights.take(hf_layer + "input_layernorm.weight")
        state[layer + "pre_mlp_layernorm.weight"] = weights.take(hf_layer + "post_attention_layernorm.weight")
    state["decoder.final_layernorm.weight"] = weights.take("model.norm.weight")
    if model.untie_embeddings_and_output_weights:
        state["output_layer.weight"] = weights.take("lm_head.weight")
    elif "lm_head.weight" in weights:
        weights.take("lm_head.weight")  # a tied copy: nothing to convert
    return state


# ---------------------------------------------------------------------------------------------
# Export


def check_exportable(model: ModelConfig) -> None:
    """Only what a Hugging Face ``LlamaForCausalLM`` computes can be exported as one."""
    wanted = {"normalization": "RMSNorm", "activation": "swiglu", "position_embedding_type": "rope",
              "add_bias_linear": False, "add_qkv_bias": False, "parallel_residual": False,
              "rotary_percent": 1.0}
    wrong = {k: getattr(model, k) for k, v in wanted.items() if getattr(model, k) != v}
    if wrong:
        raise ConversionError(
            "only Llama-style models (RMSNorm, swiglu, full rope, no biases, sequential residual) export to "
            f"Hugging Face; this model has {', '.join(f'{k}={v!r}' for k, v in wrong.items())}")


def hf_config(model: ModelConfig, **token_ids):
    """A transformers ``LlamaConfig`` for the model."""
    from transformers import LlamaConfig

    check_exportable(model)
    heads = model.num_attention_heads
    # rope_theta / rope_scaling: the spelling transformers 4.x reads and 5.x converts to rope_parameters.
    scaling = None
    if model.rope_scaling:
        scaling = {"rope_type": "llama3", "factor": float(model.rope_scaling_factor), **_MEGATRON_LLAMA3}
    return LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size or 4 * model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=model.num_query_groups or heads,
        head_dim=model.kv_channels or model.hidden_size // heads,
        hidden_act="silu",
        max_position_embeddings=model.max_position_embeddings,
        initializer_range=model.init_method_std,
        rms_norm_eps=model.layernorm_epsilon,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        rope_theta=float(model.rotary_base),
        rope_scaling=scaling,
        attention_bias=False,
        mlp_bias=False,
        architectures=["LlamaForCausalLM"],
        **token_ids,
    )


def to_hf(model: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full (TP=1) megatron state dict → ``LlamaForCausalLM`` state dict (vocab padding dropped)."""
    check_exportable(model)
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    head_dim = model.kv_channels or model.hidden_size // heads

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise ConversionError(f"megatron state dict has no {name!r}")
        return state[name]

    vocab = model.vocab_size
    out = {"model.embed_tokens.weight": get("embedding.word_embeddings.weight")[:vocab]}
    for i in range(model.num_layers):
        layer, hf_layer = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(get(layer + "self_attention.linear_qkv.weight"), heads, groups, head_dim)
        out[hf_layer + "self_attn.q_proj.weight"] = q
        out[hf_layer + "self_attn.k_proj.weight"] = k
        out[hf_layer + "self_attn.v_proj.weight"] = v
        out[hf_layer + "self_attn.o_proj.weight"] = get(layer + "self_attention.linear_proj.weight")
        gate, up = get(layer + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out[hf_layer + "mlp.gate_proj.weight"] = gate
        out[hf_layer + "mlp.up_proj.weight"] = up
        out[hf_layer + "mlp.down_proj.weight"] = get(layer + "mlp.linear_fc2.weight")
        out[hf_layer + "input_layernorm.weight"] = get(layer + "input_layernorm.weight")
        out[hf_layer + "post_attention_layernorm.weight"] = get(layer + "pre_mlp_layernorm.weight")
    out["model.norm.weight"] = get("decoder.final_layernorm.weight")
    if model.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = get("output_layer.weight")[:vocab]
    return {k: v.contiguous() for k, v in out.items()}
