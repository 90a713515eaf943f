"""What every conversion shares: the error type, megatron's fused layouts (QKV per query group,
gate/up in ``linear_fc1``), vocab padding and tensor-parallel splits.

Megatron names throughout are those of ``GPTModel.state_dict()`` at TP=1 with megatron-let's layer
specs (``decoder.layers.3.self_attention.linear_qkv.weight`` ...).
"""

from __future__ import annotations

import logging

import torch

from megatron_let.config import InputError, ModelConfig
from megatron_let.model.gpt import padded_vocab_size

logger = logging.getLogger(__name__)


class ConversionError(InputError):
    """A checkpoint cannot be converted. The message names the file and the key or setting."""


# ---------------------------------------------------------------------------------------------
# Megatron's fused layouts


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[q; k; v] (rows = heads × head_dim) → megatron's ``linear_qkv``: per query group, that
    group's query heads, then its key head, then its value head. Works for weights and biases."""
    q, k, v = (t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Inverse of :func:`fuse_qkv`: (q, k, v) with rows = heads × head_dim."""
    per_group = qkv.reshape(groups, (heads // groups + 2) * head_dim, *qkv.shape[1:])
    q_rows = heads // groups * head_dim
    q, k, v = torch.split(per_group, [q_rows, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]) for t in (q, k, v))


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU ``linear_fc1`` = [gate; up]: megatron's MLP computes ``act(first half) * second half``."""
    return torch.cat([gate, up], dim=0)


def pad_vocab(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad (with zeros) or trim the vocabulary rows of an embedding / output matrix."""
    if weight.shape[0] >= rows:
        return weight[:rows]
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def full_padded_vocab(model: ModelConfig, tp: int = 1) -> int:
    return padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)


# ---------------------------------------------------------------------------------------------
# Tensor-parallel split of a full (TP=1) megatron state dict

_COLUMN = ("self_attention.linear_qkv.", "mlp.linear_fc1.")  # split along output rows
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")  # split along input columns
_VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")


def shard_state_dict(
    full: dict[str, torch.Tensor], model_config: ModelConfig, tp_rank: int, tp_size: int
) -> dict[str, torch.Tensor]:
    """This TP rank's part of a full state dict, named and shaped as ``GPTModel.state_dict()`` of a
    model built by ``build_gpt(model_config, ..., tensor_parallel=tp_size)``.

    Vocab rows are padded (zeros) or trimmed to that model's padded vocab, then split;
    ``linear_qkv`` splits by whole query groups (each group's rows are contiguous); a SwiGLU
    ``linear_fc1`` gives each rank [its gate rows; its up rows]; row-parallel biases and norms are
    replicated. Load the result with :func:`load_into`.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is outside tensor parallel size {tp_size}")
    groups = model_config.num_query_groups or model_config.num_attention_heads
    if model_config.num_attention_heads % tp_size or groups % tp_size:
        raise ConversionError(
            f"tensor parallel size {tp_size} does not divide {model_config.num_attention_heads} "
            f"heads / {groups} query groups"
        )
    vocab_rows = full_padded_vocab(model_config, tp_size)
    gated = model_config.activation == "swiglu"
    shard = {}
    for name, tensor in full.items():
        if name in _VOCAB:
            tensor = pad_vocab(tensor, vocab_rows).chunk(tp_size, dim=0)[tp_rank]
        elif any(part in name for part in _COLUMN):
            if gated and "mlp.linear_fc1." in name:
                gate, up = tensor.chunk(2, dim=0)
                tensor = torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
            else:
                tensor = tensor.chunk(tp_size, dim=0)[tp_rank]
        elif any(name.endswith(part) for part in _ROW):
            tensor = tensor.chunk(tp_size, dim=1)[tp_rank]
        shard[name] = tensor.contiguous()
    return shard


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)``, where only megatron's ``_extra_state`` entries (which a
    converted state dict does not carry) may be missing."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
    if missing or result.unexpected_keys:
        raise ConversionError(
            f"state dict does not fit the model: missing {missing}, unexpected {list(result.unexpected_keys)}"
        )
