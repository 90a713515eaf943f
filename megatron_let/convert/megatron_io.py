"""megatron-let checkpoints in and out of a single conversion process.

Conversions run in one process at TP=PP=1, on the CPU (inside megatron_let.platform.cpu's scoped
``cpu_mode()``, so they also run inside a process that does other things). That is
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
from megatron_let.convert.destination import SOURCE_KEY, check_import_destination, staged
from megatron_let.convert.hf_import import HFModel, read_hf
from megatron_let.model.gpt import TE_NORM_NAMES
from megatron_let.platform import cpu

logger = logging.getLogger(__name__)

EMBEDDING = "embedding.word_embeddings.weight"


def ensure_megatron() -> None:
    """A megatron world at TP=PP=1 on the CPU, unless one exists already (then it must be TP=PP=1)."""
    from megatron.core import parallel_state

    from megatron_let.platform import distributed as parallel

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
    from megatron_let.model.gpt import build_gpt, transformer_config

    padded = dataclasses.replace(model, make_vocab_size_divisible_by=vocab_rows)
    gpt = build_gpt(padded, transformer_config(padded, on_cpu=True), use_te=False, tensor_parallel=1)
    gpt.eval()
    return gpt, padded


def import_checkpoint(
    hf_path: str | Path, out_dir: str | Path, tp: int = 1, gguf_file: Optional[str] = None, overwrite: bool = False
) -> Path:
    """Hugging Face model → megatron-let checkpoint at iteration 0 (``<out_dir>/iter_0000000``),
    usable as ``teacher.load`` (or ``checkpoint.load``) at tensor parallel size ``tp``.

    Saved in one process at TP=1 (dist-checkpointing reshards on load); ``tp`` sets the vocab
    padding. The common state's ``config`` is a full LETConfig dict whose ``model`` section is the
    converted ModelConfig, plus ``converted_from``: the source, its architecture, the special-token
    ids it states and the HF rows megatron has no place for (so that an export gives them back).
    ``out_dir`` must be new or empty, or (with ``overwrite``) a previous import: never a training
    checkpoint. The checkpoint is written beside it and renamed into place. Returns the checkpoint
    directory.
    """
    from megatron_let.checkpoint import iteration_dir, save_checkpoint

    out = check_import_destination(Path(out_dir), overwrite)
    hf = read_hf(hf_path, gguf_file)
    model = hf.model
    groups = model.num_query_groups or model.num_attention_heads
    if tp < 1 or model.num_attention_heads % tp or groups % tp:
        raise ConversionError(
            f"--tensor-model-parallel-size {tp} does not divide the model's "
            f"{model.num_attention_heads} heads / {groups} query groups"
        )
    with cpu.cpu_mode():
        ensure_megatron()
        gpt, padded = build_model(model, full_padded_vocab(model, tp))
        load_into(gpt, shard_state_dict(hf.state, padded, 0, 1))
        config = to_dict(LETConfig(model=model, parallel=ParallelConfig(tensor_model_parallel_size=tp)))
        config[SOURCE_KEY] = source_record(hf, hf_path, gguf_file)
        with staged(out) as tmp:
            save_checkpoint(tmp, 0, [gpt], None, None, 0, config)
    directory = iteration_dir(out, 0)
    logger.info("wrote %s", directory)
    return directory


def source_record(hf: HFModel, hf_path, gguf_file: Optional[str]) -> dict:
    """What an import records about its source (plain data: kept rows as nested lists + dtype)."""
    return {
        "format": "huggingface",
        "path": str(hf_path),
        "gguf_file": gguf_file,
        "model_type": hf.architecture.model_type,
        "token_ids": dict(hf.token_ids),
        "kept": {
            name: {"dtype": str(t.dtype).removeprefix("torch."), "rows": t.tolist()} for name, t in hf.kept.items()
        },
    }


def recorded_source(ckpt_dir: str | Path) -> dict:
    """The ``converted_from`` record of an imported checkpoint ({} for a training checkpoint),
    with the kept rows as tensors again."""
    _, common = _common_state(ckpt_dir)
    record = (common.get("config") or {}).get(SOURCE_KEY)
    if not isinstance(record, dict):
        return {}
    kept = {}
    for name, entry in (record.get("kept") or {}).items():
        kept[name] = torch.tensor(entry["rows"], dtype=getattr(torch, entry["dtype"]))
    return {**record, "kept": kept}


def _common_state(ckpt_dir: str | Path) -> tuple[Path, dict]:
    """The checkpoint directory a root or ``iter_*`` path names, and its common state."""
    from megatron.core import dist_checkpointing

    from megatron_let.checkpoint import resolve_checkpoint

    try:
        directory = resolve_checkpoint(ckpt_dir)
    except (FileNotFoundError, ValueError) as err:
        raise ConversionError(str(err)) from None
    try:
        common = dist_checkpointing.load_common_state_dict(str(directory))
    except Exception as err:  # noqa: BLE001 - megatron/torch raise many kinds for a damaged checkpoint
        raise ConversionError(
            f"{directory}: cannot read the checkpoint's common state (incomplete or corrupt?): {_describe(err)}"
        ) from None
    if not isinstance(common, dict):
        raise ConversionError(f"{directory}: the checkpoint's common state is not a dict")
    return directory, common


def checkpoint_model_config(ckpt_dir: str | Path) -> tuple[Path, ModelConfig]:
    """The checkpoint's directory and the ModelConfig stored in its common state."""
    directory, common = _common_state(ckpt_dir)
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
    try:
        metadata = dist_checkpointing.load_tensors_metadata(str(directory))
    except Exception as err:  # noqa: BLE001 - as below
        raise ConversionError(
            f"{directory}: cannot read the checkpoint's tensor metadata (incomplete or corrupt?): {_describe(err)}"
        ) from None
    if EMBEDDING not in metadata:
        raise ConversionError(f"{directory}: no {EMBEDDING} in the checkpoint")
    with cpu.cpu_mode():
        ensure_megatron()
        gpt, _ = build_model(model, metadata[EMBEDDING].global_shape[0])
        # Weights only: megatron's _extra_state objects carry nothing a conversion needs.
        request = {k: v for k, v in gpt.sharded_state_dict().items() if not isinstance(v, ShardedObject)}
        for tensor in request.values():
            tensor.key = _stored_name(tensor.key, metadata, directory)
        try:
            loaded = dist_checkpointing.load({"model": request}, str(directory))["model"]
        except (Exception, _CheckpointException) as err:  # noqa: BLE001 - a truncated shard, a mismatch, ...
            raise ConversionError(
                f"{directory}: cannot read the model weights (incomplete or corrupt checkpoint?): {_describe(err)}"
            ) from None
    load_into(gpt, loaded)
    state = {k: v.detach().clone() for k, v in gpt.state_dict().items() if not k.endswith("._extra_state")}
    return model, state


try:  # torch.distributed.checkpoint wraps each rank's error in it, and it is a BaseException
    from torch.distributed.checkpoint.api import CheckpointException as _CheckpointException
except ImportError:  # pragma: no cover - older torch

    class _CheckpointException(Exception):  # type: ignore[no-redef]
        pass


def _describe(err: BaseException) -> str:
    """One line for an error from reading a checkpoint: torch's CheckpointException carries each
    rank's exception with its traceback as text; the first rank's exception is what matters."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            err = inner
    lines = str(err).strip().splitlines()
    if lines:
        return f"{type(err).__name__}: {lines[0][:300]}"
    return "EOFError: a file ends early (truncated?)" if isinstance(err, EOFError) else type(err).__name__


def _stored_name(key: str, metadata: dict, directory: Path) -> str:
    if key in metadata:
        return key
    for local, te in TE_NORM_NAMES.items():
        if local in key and key.replace(local, te) in metadata:
            return key.replace(local, te)
    raise ConversionError(f"{directory}: the checkpoint has no tensor {key!r}")
