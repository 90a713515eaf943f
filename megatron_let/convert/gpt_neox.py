"""GPT-NeoX (Pythia): LayerNorm with bias, GeLU MLP, biases on linears, partial rotary
(``rotary_pct``), untied ``embed_out``, and usually the parallel residual
``x + attn(ln1(x)) + mlp(ln2(x))`` (megatron_let.layers.ParallelResidualTransformerLayer).

The fused ``query_key_value`` already holds, per head, [q; k; v]: megatron's layout with one query
head per group, so it is copied as is.
"""

from __future__ import annotations

import torch

from megatron_let.config import ModelConfig
from megatron_let.convert.common import HFWeights, rope_settings, rotary_base, unsupported

MODEL_TYPES = ("gpt_neox",)
BASE_PREFIX = "gpt_neox."
# Buffers old checkpoints saved: the causal mask, its fill value and RoPE frequencies.
IGNORED = (r"attention\.bias$", r"attention\.masked_bias$", r"rotary_emb\.inv_freq$")

_ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}


def model_config(hf) -> ModelConfig:
    if hf.hidden_act not in _ACTIVATIONS:
        raise unsupported(hf, "hidden_act", hf.hidden_act, f"supported: {', '.join(_ACTIVATIONS)}")
    if not getattr(hf, "attention_bias", True):
        raise unsupported(hf, "attention_bias", False,
                          "GPT-NeoX's MLP keeps its biases; megatron's add_bias_linear is all or none")
    rope = rope_settings(hf)
    if rope["rope_type"] != "default":
        raise unsupported(hf, "rope_type", rope["rope_type"], "GPT-NeoX converts with plain RoPE only")
    return ModelConfig(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads,
        ffn_hidden_size=hf.intermediate_size,
        vocab_size=hf.vocab_size,
        max_position_embeddings=hf.max_position_embeddings,
        normalization="LayerNorm",
        layernorm_epsilon=float(hf.layer_norm_eps),
        activation=_ACTIVATIONS[hf.hidden_act],
        position_embedding_type="rope",
        rotary_base=rotary_base(hf, rope["rope_theta"]),
        rotary_percent=float(rope["partial_rotary_factor"]),
        add_bias_linear=True,
        parallel_residual=bool(hf.use_parallel_residual),
        untie_embeddings_and_output_weights=not getattr(hf, "tie_word_embeddings", False),
        init_method_std=float(getattr(hf, "initializer_range", 0.02)),
    )


def to_megatron(hf, model: ModelConfig, weights: HFWeights) -> dict[str, torch.Tensor]:
    names = {
        "input_layernorm": "input_layernorm",
        "post_attention_layernorm": "pre_mlp_layernorm",
        "attention.query_key_value": "self_attention.linear_qkv",
        "attention.dense": "self_attention.linear_proj",
        "mlp.dense_h_to_4h": "mlp.linear_fc1",
        "mlp.dense_4h_to_h": "mlp.linear_fc2",
    }
    state = {"embedding.word_embeddings.weight": weights.take("gpt_neox.embed_in.weight")}
    for i in range(model.num_layers):
        for hf_name, name in names.items():
            for suffix in ("weight", "bias"):
                state[f"decoder.layers.{i}.{name}.{suffix}"] = weights.take(f"gpt_neox.layers.{i}.{hf_name}.{suffix}")
    for suffix in ("weight", "bias"):
        state[f"decoder.final_layernorm.{suffix}"] = weights.take(f"gpt_neox.final_layer_norm.{suffix}")
    if model.untie_embeddings_and_output_weights:
        state["output_layer.weight"] = weights.take("embed_out.weight")
    elif "embed_out.weight" in weights:
        weights.take("embed_out.weight")
    return state
