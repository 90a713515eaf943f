"""Which pipeline stage owns layer k, against hand-computed layouts; the aux-loss scaler's gradient."""

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_let.objectives.hook import AlignmentLossScaler, layer_owner


def config(num_layers, pp, vpp=None, first=None, last=None):
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=64,
        num_attention_heads=4,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        pipeline_dtype=torch.float32,
    )


def by_hand(layer, stage_sizes):
    """stage_sizes: [(pp_rank, vp_stage, n_layers)] in global layer order."""
    start = 0
    for pp_rank, vp_stage, count in stage_sizes:
        if start < layer <= start + count:
            return pp_rank, vp_stage
        start += count
    raise AssertionError


@pytest.mark.parametrize("layer", range(1, 9))
def test_even_pipeline(layer):
    assert layer_owner(config(8, 4), layer) == by_hand(layer, [(r, None, 2) for r in range(4)])


@pytest.mark.parametrize("layer", range(1, 9))
def test_interleaved_pipeline(layer):
    # Chunk 0 of ranks 0..3 holds layers 1..4, chunk 1 holds layers 5..8.
    layout = [(r, 0, 1) for r in range(4)] + [(r, 1, 1) for r in range(4)]
    assert layer_owner(config(8, 4, vpp=2), layer) == by_hand(layer, layout)


@pytest.mark.parametrize("layer", range(1, 11))
def test_uneven_first_and_last_stages(layer):
    layout = [(0, None, 1), (1, None, 4), (2, None, 4), (3, None, 1)]
    assert layer_owner(config(10, 4, first=1, last=1), layer) == by_hand(layer, layout)


def test_layer_outside_the_model():
    with pytest.raises(ValueError, match="layer 9"):
        layer_owner(config(8, 2), 9)


def test_aux_loss_scaler_adds_the_scaled_alignment_gradient():
    h = torch.randn(5, 2, 8, requires_grad=True)
    aux = (h**2).sum() * 0.3
    scale = torch.tensor([0.25])
    out = AlignmentLossScaler.apply(h, aux, scale)
    torch.testing.assert_close(out, h)
    (out * 2.0).sum().backward()
    # d/dh [2·Σh] + 0.25 · d/dh [0.3·Σh²] = 2 + 0.25·0.6·h
    torch.testing.assert_close(h.grad, 2.0 + 0.25 * 0.6 * h.detach())
