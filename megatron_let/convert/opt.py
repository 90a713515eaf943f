"""OPT: learned absolute positions, ReLU MLP, LayerNorm with bias, biases on linears, tied head.

OPT looks positions up at ``position + 2`` (a fairseq padding offset); megatron at ``position``.
The first two rows of ``embed_positions`` are therefore dropped: megatron row p = OPT row p + 2.
Post-norm OPT (``do_layer_norm_before=False``, OPT-350m) and projected embeddings
(``word_embed_proj_dim != hidden_size``) have no megatron equivalent and are refused.
"""

from __future__ import annotations

import torch

from megatron_let.config import ModelConfig
from megatron_let.convert.common import ConversionError, HFWeights, fuse_qkv, unsupported

MODEL_TYPES = ("opt",)
BASE_PREFIX = "model."
IGNORED = ()
POSITION_OFFSET = 2

_ACTIVATIONS = {"relu": "relu", "gelu": "gelu"}


def model_config(hf) -> ModelConfig:
    if not getattr(hf, "do_layer_norm_before", True):
        raise unsupported(hf, "do_layer_norm_before", False, "post-norm OPT has no megatron equivalent")
    proj = getattr(hf, "word_embed_proj_dim", None) or hf.hidden_size
    if proj != hf.hidden_size:
        raise unsupported(hf, "word_embed_proj_dim", proj,
                          f"differs from hidden_size={hf.hidden_size} (project_in/project_out have no megatron equivalent)")
    if getattr(hf, "_remove_final_layer_norm", False):
        raise unsupported(hf, "_remove_final_layer_norm", True, "megatron always applies a final norm")
    if hf.activation_function not in _ACTIVATIONS:
        raise unsupported(hf, "activation_function", hf.activation_function, f"supported: {', '.join(_ACTIVATIONS)}")
    return ModelConfig(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads,
        ffn_hidden_size=hf.ffn_dim,
        vocab_size=hf.vocab_size,
        max_position_embeddings=hf.max_position_embeddings,
        normalization="LayerNorm",
        layernorm_epsilon=1e-5,  # OPT's nn.LayerNorm default
        activation=_ACTIVATIONS[hf.activation_function],
        position_embedding_type="learned_absolute",
        add_bias_linear=bool(getattr(hf, "enable_bias", True)),
        untie_embeddings_and_output_weights=not getattr(hf, "tie_word_embeddings", True),
        init_method_std=float(getattr(hf, "init_std", 0.02)),
    )


def to_megatron(hf, model: ModelConfig, weights: HFWeights) -> dict[str, torch.Tensor]:
    affine = getattr(hf, "layer_norm_elementwise_affine", True)
    h = model.hidden_size

    def norm(hf_name: str, name: str) -> None:
        if affine:
            state[name + ".weight"] = weights.take(hf_name + ".weight")
            state[name + ".bias"] = weights.take(hf_name + ".bias")
        else:  # a LayerNorm without parameters = weight 1, bias 0
            state[name + ".weight"] = torch.ones(h)
            state[name + ".bias"] = torch.zeros(h)

    positions = weights.take("model.decoder.embed_positions.weight")
    expected = model.max_position_embeddings + POSITION_OFFSET
    if positions.shape[0] != expected:
        raise ConversionError(f"{weights.source}: model.decoder.embed_positions.weight has {positions.shape[0]} rows, "
                              f"expected max_position_embeddings + {POSITION_OFFSET} = {expected}")
    state = {
        "embedding.word_embeddings.weight": weights.take("model.decoder.embed_tokens.weight"),
        "embedding.position_embeddings.weight": positions[POSITION_OFFSET:],
    }
    suffixes = ("weight", "bias") if model.add_bias_linear else ("weight",)
    for i in range(model.num_layers):
        hf_layer, layer = f"model.decoder.layers.{i}.", f"decoder.layers.{i}."
        attn = hf_layer + "self_attn."
        for suffix in suffixes:
            state[layer + f"self_attention.linear_qkv.{suffix}"] = fuse_qkv(
                *(weights.take(f"{attn}{p}_proj.{suffix}") for p in "qkv"), model.num_attention_heads)
            state[layer + f"self_attention.linear_proj.{suffix}"] = weights.take(f"{attn}out_proj.{suffix}")
            state[layer + f"mlp.linear_fc1.{suffix}"] = weights.take(f"{hf_layer}fc1.{suffix}")
            state[layer + f"mlp.linear_fc2.{suffix}"] = weights.take(f"{hf_layer}fc2.{suffix}")
        norm(hf_layer + "self_attn_layer_norm", layer + "input_layernorm")
        norm(hf_layer + "final_layer_norm", layer + "pre_mlp_layernorm")
    norm("model.decoder.final_layer_norm", "decoder.final_layernorm")
    if model.untie_embeddings_and_output_weights:
        state["output_layer.weight"] = weights.take("lm_head.weight")
    elif "lm_head.weight" in weights:
        weights.take("lm_head.weight")
    return state
