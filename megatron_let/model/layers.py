"""Transformer layers that megatron-core's stock ``TransformerLayer`` cannot express.

They plug into a layer spec in place of ``TransformerLayer`` and keep its submodules, so their
weights, state-dict names and dist-checkpoint keys are those of the stock layer.

* :class:`SeededTransformerLayer`: the stock layer, its weights drawn from a generator seeded by
  (seed, global layer index), whatever the pipeline layout (see :mod:`megatron_let.model.initialization`).
* :class:`ParallelResidualTransformerLayer`: the GPT-NeoX block (seeded the same way).
"""

from __future__ import annotations

from typing import Any, Optional

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset
from megatron.core.utils import deprecate_inference_params, get_pg_rank, make_viewless_tensor
from torch import Tensor

from megatron_let.model import initialization


class SeededTransformerLayer(TransformerLayer):
    """megatron's ``TransformerLayer``, built under a CPU generator seeded from (seed,
    ``decoder.layers.{i}``) with ``i`` the layer's global 0-based index: its initial weights are the
    same on whichever pipeline stage / virtual chunk builds it. megatron's own init methods and draw
    order are kept; the process's RNG is restored afterwards."""

    def __init__(
        self,
        config,
        submodules,
        layer_number: int = 1,
        hidden_dropout: Optional[float] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        vp_stage: Optional[int] = None,
    ):
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        # The same global number TransformerLayer computes (layer_number is 1-based within the chunk).
        index = layer_number - 1 + get_transformer_layer_offset(config, vp_stage, get_pg_rank(pg_collection.pp))
        with initialization.seeded(f"decoder.layers.{index}"):
            super().__init__(
                config,
                submodules,
                layer_number=layer_number,
                hidden_dropout=hidden_dropout,
                pg_collection=pg_collection,
                vp_stage=vp_stage,
            )


class ParallelResidualTransformerLayer(SeededTransformerLayer):
    """GPT-NeoX / GPT-J block: ``x + attn(ln1(x)) + mlp(ln2(x))``.

    Attention and MLP both read the layer's input (megatron's layer feeds the MLP with the
    attention's output). With Transformer Engine specs the two norms are fused into ``linear_qkv``
    and ``linear_fc1``; the forward below is the same either way.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.recompute_input_layernorm or self.recompute_pre_mlp_layernorm or self.recompute_mlp:
            raise NotImplementedError(
                "parallel_residual layers do not support selective recompute of norms/MLP "
                "(use full-layer recompute or none)"
            )

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        context: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
        rotary_pos_emb: Optional[Tensor] = None,
        rotary_pos_cos: Optional[Tensor] = None,
        rotary_pos_sin: Optional[Tensor] = None,
        rotary_pos_cos_sin: Optional[Tensor] = None,
        attention_bias: Optional[Tensor] = None,
        inference_context: Optional[Any] = None,
        packed_seq_params: Optional[Any] = None,
        sequence_len_offset: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
        *,
        inference_params: Optional[Any] = None,
        **_unused,
    ):
        inference_context = deprecate_inference_params(inference_context, inference_params)
        residual = hidden_states
        attention_output_with_bias = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        mlp_output_with_bias = self.mlp(self.pre_mlp_layernorm(hidden_states), padding_mask=padding_mask)
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attention_output_with_bias, residual, self.hidden_dropout
            )
            hidden_states = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
                mlp_output_with_bias, hidden_states, self.hidden_dropout
            )
        output = make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True)
        return output, context
