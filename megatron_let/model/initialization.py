"""Initial weights that depend on the seed and each parameter's global identity only.

megatron-core draws every weight from the RNG in construction order, and each rank builds only its
own pipeline stage (or virtual chunks). With one seed everywhere, stage 1's first layer then draws
what stage 0's first layer draws (layer i and layer i + L/PP start identical); Megatron-LM offsets
the seed by 100 × pipeline rank, which avoids the copies but makes the model a function of the
layout. Here the initial model is the same for every TP × PP × VPP × DP layout:

* every ``TransformerLayer`` is built under a CPU generator seeded from (seed, ``decoder.layers.{i}``),
  ``i`` its *global* 0-based index (:class:`megatron_let.model.layers.SeededTransformerLayer`), keeping
  megatron's own distributions (``init_method`` / ``output_layer_init_method``, zero biases, unit
  norms) and draw order;
* the word embeddings, learned position embeddings and output layer are drawn after construction
  from generators seeded from (seed, their parameter name); rows of the real vocabulary do not
  depend on the TP-dependent vocabulary padding (the padding rows come from a stream of their own);
* every weight is drawn as the full, unsharded tensor and then split (megatron's
  ``use_cpu_initialization``, set in :func:`megatron_let.model.gpt.transformer_config` on GPU too — see
  the comment there), so tensor parallelism does not change it either;
* the whole build runs inside a fork of the CPU RNG (:func:`build_scope`), so building draws nothing
  from the RNG the training run goes on with: dropout starts from the same state on every layout.

The seed of a build is the one given to :func:`build_scope`; :func:`megatron_let.model.gpt.build_gpt`
passes the seed last given to ``torch.manual_seed`` (``parallel.seed_everything``, or the
teacher's own seed) unless told otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Iterator, Optional

import torch

_BASE_SEED: Optional[int] = None  # set by build_scope for the model being built


def derive_seed(seed: int, key: str) -> int:
    """A 63-bit seed for ``key`` (a parameter or module name), the same in every process."""
    digest = hashlib.sha256(f"megatron-let/{int(seed)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def base_seed() -> int:
    """The seed of the model being built: :func:`build_scope`'s, else ``torch.initial_seed()``."""
    return _BASE_SEED if _BASE_SEED is not None else torch.initial_seed()


@contextlib.contextmanager
def build_scope(seed: int) -> Iterator[None]:
    """Build a model for ``seed`` inside a fork of the CPU RNG: whatever the build draws, the
    process's RNG is left as it was. Only the CPU generator is forked and seeded: with CPU
    initialisation nothing in the build draws from a CUDA generator, and dropout's CUDA streams
    (megatron's RNG tracker) must stay as ``model_parallel_cuda_manual_seed`` left them."""
    global _BASE_SEED
    previous = _BASE_SEED
    with torch.random.fork_rng(devices=[]):
        _BASE_SEED = int(seed)
        try:
            yield
        finally:
            _BASE_SEED = previous


@contextlib.contextmanager
def seeded(key: str) -> Iterator[None]:
    """Run the body with the CPU generator seeded from (:func:`base_seed`, ``key``); restore it after."""
    seed = derive_seed(base_seed(), key)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _draw(key: str, rows: int, columns: int, init_method: Callable) -> torch.Tensor:
    """A [rows, columns] fp32 tensor from ``init_method`` under the generator for ``key``."""
    with seeded(key):
        tensor = torch.empty(rows, columns, dtype=torch.float32)
        init_method(tensor)
    return tensor


@torch.no_grad()
def _init_vocab_shard(
    weight: torch.Tensor, key: str, vocab_size: int, padded_vocab_size: int, start: int, init_method: Callable
) -> None:
    """``weight`` holds rows [start, start + len) of a [padded_vocab_size, h] tensor split along the
    vocabulary (megatron's VocabParallelEmbedding / output ColumnParallelLinear)."""
    rows, hidden = weight.shape
    real = _draw(key, vocab_size, hidden, init_method)
    if padded_vocab_size > vocab_size:
        real = torch.cat([real, _draw(f"{key}/padding", padded_vocab_size - vocab_size, hidden, init_method)])
    weight.data.copy_(real[start : start + rows].to(dtype=weight.dtype))


@torch.no_grad()
def init_embedding_and_output(gpt, vocab_size: int) -> None:
    """(Re)draw a freshly built GPTModel's word embeddings, learned position embeddings and output
    layer from generators keyed by their names (see the module docstring). ``vocab_size`` is the
    real (unpadded) vocabulary size."""
    config = gpt.config
    if not config.perform_initialization:
        return
    padded = gpt.vocab_size
    embedding = getattr(gpt, "embedding", None) if gpt.pre_process else None
    word_key = "embedding.word_embeddings.weight"
    if embedding is not None:
        words = embedding.word_embeddings
        _init_vocab_shard(
            words.weight, word_key, vocab_size, padded, words.vocab_start_index, config.embedding_init_method
        )
        positions = getattr(embedding, "position_embeddings", None)
        if positions is not None:
            rows, columns = positions.weight.shape
            full = _draw("embedding.position_embeddings.weight", rows, columns, config.embedding_init_method)
            positions.weight.data.copy_(full.to(dtype=positions.weight.dtype))
    output = getattr(gpt, "output_layer", None) if gpt.post_process else None
    if output is not None and output.weight is not None:
        from megatron.core.utils import get_pg_rank

        start = get_pg_rank(output.tp_group) * output.output_size_per_partition
        if gpt.share_embeddings_and_output_weights:
            # The last stage's copy of the tied embedding: the same draw as the first stage's.
            _init_vocab_shard(output.weight, word_key, vocab_size, padded, start, config.embedding_init_method)
        else:
            _init_vocab_shard(output.weight, "output_layer.weight", vocab_size, padded, start, config.init_method)
