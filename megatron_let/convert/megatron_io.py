"""megatron-let checkpoints in and out of a single conversion process.

Conversions run in one process at TP=PP=1, on the CPU (``device: cpu``: this patches torch
process-wide, see megatron_let.cpu, so run them in a process of their own, e.g. the CLI). That is
enough because megatron dist-checkpointing reshards on load: a checkpoint saved at TP=1 loads at
any TP, and one saved at any TP/PP loads at TP=PP=1. What resharding cannot change is the padded
vocab size (a multiple of ``make_vocab_size_divisible_by × TP``), so an import pads the vocab for
the TP it will be loaded at, and an export reads the padding from the checkpoint itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_let.config import LETConfig, ModelConfig, ParallelConfig, to_dict
from megatron_let.convert.common import ConversionError, full_padded_vocab, load_into, shard_state_dict
from megatron_let.convert.hf_import import load_hf

logger = logging.getLogger(__name__)

EMBEDDING = "embedding.word_embeddings.weight"
# Local layer specs name the norms on their own; Transformer Engine specs fuse them into the next
# linear. A checkpoint written with one loads into the other under these names.
_TE_NORM_NAMES = {".input_layernorm.": ".self_attention.linear_qkv.layer_norm_",
                  ".pre_mlp_layernorm.": ".mlp.linear_fc1.layer_norm_"}


def ensure_megatron() -> None:
    """A megatron world at TP=PP=1 on the CPU, unless one exists already (then it must be TP=PP=1)."""
    from megatron.core import parallel_state

    from megatron_let import parallel

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if (tp, pp) != (1, 1):
            raise ConversionError(f"conversion runs at TP=PP=1, but this process has TP={tp}, PP={pp}")
        return
    if "WORLD_SIZE" not in os.environ:  # a plain process, not a torchrun worker: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    parallel.init_distributed(LETConfig(device="cpu"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(model: ModelConfig, vocab_rows: int):
    """A TP=1 GPTModel (fp32, local layer specs) whose embedding has exactly ``vocab_rows`` rows."""
    from megatron_let.model import build_gpt, transformer_config

    padded = dataclasses.replace(model, make_vocab_size_divisible_by=vocab_rows)
    gpt = build_gpt(padded, transformer_config(padded, on_cpu=True), use_te=False, tensor_parallel=1)
    gpt.eval()
    return gpt, padded


def import_checkpoint(hf_path: str | Path, out_dir: str | Path, tp: int = 1,
                      gguf_file: Optional[str] = None) -> Path:
    """Hugging Face model → megatron-let checkpoint at iteration 0 (``<out_dir>/iter_0000000``),
    usable as ``teacher.load`` (or ``checkpoint.load``) at tensor parallel size ``tp``.

    Saved in one process at TP=1 (dist-checkpointing reshards on load); ``tp`` sets the vocab
    padding. The common state's ``config`` is a full LETConfig dict whose ``model`` section is the
    converted ModelConfig. Returns the checkpoint directory.
    """
    from megatron_let.checkpoint import save_checkpoint

    model, full = load_hf(hf_path, gguf_file)
    groups = model.num_query_groups or model.num_attention_heads
    if tp < 1 or model.num_attention_heads % tp or groups % tp:
        raise ConversionError(f"--tensor-model-parallel-size {tp} does not divide the model's "
                              f"{model.num_attention_heads} heads / {groups} query groups")
    ensure_megatron()
    gpt, padded = build_model(model, full_padded_vocab(model, tp))
    load_into(gpt, shard_state_dict(full, padded, 0, 1))
    config = to_dict(LETConfig(model=model, parallel=ParallelConfig(tensor_model_parallel_size=tp)))
    directory = save_checkpoint(out_dir, 0, [gpt], None, None, 0, config)
    logger.info("wrote %s", directory)
    return directory


def checkpoint_model_config(ckpt_dir: str | Path) -> tuple[Path, ModelConfig]:
    """The checkpoint's directory and the ModelConfig stored in its common state."""
    from megatron.core import dist_checkpointing

    from megatron_let.checkpoint import resolve_checkpoint

    try:
        directory = resolve_checkpoint(ckpt_dir)
    except (FileNotFoundError, ValueError) as err:
        raise ConversionError(str(err)) from None
    common = dist_checkpointing.load_common_state_dict(str(directory))
    section = (common.get("config") or {}).get("model")
    if not isinstance(section, dict):
        raise ConversionError(f"{directory}: no model config in the checkpoint (common state 'config.model')")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConversionError(f"{directory}: config.model has settings this version does not know: {unknown}")
    return directory, ModelConfig(**section)


def read_checkpoint(ckpt_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A megatron-let checkpoint saved at any TP/PP → (ModelConfig, full TP=1 state dict).

    The vocab keeps the checkpoint's padding."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    directory, model = checkpoint_model_config(ckpt_dir)
    metadata = dist_checkpointing.load_tensors_metadata(str(directory))
    if EMBEDDING not in metadata:
        raise ConversionError(f"{directory}: no {EMBEDDING} in the checkpoint")
    ensure_megatron()
    gpt, _ = build_model(model, metadata[EMBEDDING].global_shape[0])
    # Weights only: megatron's _extra_state objects carry nothing a conversion needs.
    request = {k: v for k, v in gpt.sharded_state_dict().items() if not isinstance(v, ShardedObject)}
    for tensor in request.values():
        tensor.key = _stored_name(tensor.key, metadata, directory)
    loaded = dist_checkpointing.load({"model": request}, str(directory))["model"]
    load_into(gpt, loaded)
    state = {k: v.detach().clone() for k, v in gpt.state_dict().items() if not k.endswith("._extra_state")}
    return model, state


def _stored_name(key: str, metadata: dict, directory: Path) -> str:
    if key in metadata:
        return key
    for local, te in _TE_NORM_NAMES.items():
        if local in key and key.replace(local, te) in metadata:
            return key.replace(local, te)
    raise ConversionError(f"{directory}: the checkpoint has no tensor {key!r}")
