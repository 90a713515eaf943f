"""megatron-let checkpoint → Hugging Face directory (config.json, safetensors, generation_config.json,
tokenizer files) that ``AutoModelForCausalLM.from_pretrained`` loads, by running the architecture's
tables backwards: Llama, GPT-NeoX or OPT, whichever the model is (or the checkpoint was imported from).

The result is written beside the destination and renamed into place; a non-empty destination is
refused unless ``overwrite``. bos/eos/pad ids come from the tokenizer (``tokenizer_dir``), else from
what the checkpoint recorded when it was imported; unknown ids are written as null, never as a
config class's defaults.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Mapping, Optional

import torch

from megatron_let.config import ModelConfig
from megatron_let.convert.architectures import ARCHITECTURES, for_model
from megatron_let.convert.common import ConversionError
from megatron_let.convert.destination import check_export_destination, staged
from megatron_let.convert.hf_files import TOKEN_ID_KEYS, save_safetensors
from megatron_let.convert.mapping import Architecture, Layout

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default shard size
EMBEDDING = "embedding.word_embeddings.weight"


def export_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    tokenizer_dir: Optional[str | Path] = None,
    architecture: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """A megatron-let checkpoint saved at any TP/PP (read at TP=PP=1 in this process) → a Hugging
    Face directory. ``architecture``: ``llama``, ``gpt_neox`` or ``opt``; default: the one the
    checkpoint was imported from, else the one whose table expresses the model. Returns ``out_dir``."""
    from megatron_let.checkpoint import TRACKER
    from megatron_let.convert.megatron_io import checkpoint_model_config, read_checkpoint, recorded_source

    directory, model = checkpoint_model_config(ckpt_dir)
    record = recorded_source(directory)
    arch = _choose(model, architecture, record, str(directory))
    arch.check_exportable(model)  # before spending time on the weights
    root = directory.parent if (directory.parent / TRACKER).exists() else directory
    check_export_destination(Path(out_dir), overwrite, source=root)
    if tokenizer_dir is not None:
        _tokenizer_files(Path(tokenizer_dir))
    model, state = read_checkpoint(directory)
    same_source = record.get("model_type") == arch.model_type
    return write_hf(
        model,
        state,
        out_dir,
        tokenizer_dir,
        architecture=arch,
        overwrite=overwrite,
        token_ids=record.get("token_ids"),
        kept=record.get("kept") if same_source else None,
        source=str(directory),
    )


def _choose(model: ModelConfig, name: Optional[str], record: dict, source: str) -> Architecture:
    if name is not None:
        if name not in ARCHITECTURES:
            raise ConversionError(f"--architecture {name!r}: supported: {', '.join(sorted(ARCHITECTURES))}")
        return ARCHITECTURES[name]
    recorded = ARCHITECTURES.get(str(record.get("model_type")))
    if recorded is not None and not recorded.problems(model):
        return recorded
    return for_model(model, source)


def write_hf(
    model: ModelConfig,
    state: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    tokenizer_dir: Optional[str | Path] = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    architecture: str | Architecture = "llama",
    *,
    overwrite: bool = False,
    token_ids: Optional[Mapping] = None,
    kept: Optional[Mapping[str, torch.Tensor]] = None,
    source: str = "the model",
) -> Path:
    """Write a full (TP=1) megatron state dict (any vocab padding) as a Hugging Face directory of
    ``architecture``. ``token_ids``: bos/eos/pad ids recorded elsewhere (the tokenizer's win);
    ``kept``: HF rows an import set aside (mapping.Offset)."""
    from transformers import GenerationConfig

    arch = ARCHITECTURES[architecture] if isinstance(architecture, str) else architecture
    arch.check_exportable(model)
    out = check_export_destination(Path(out_dir), overwrite)
    tokenizer_files = _tokenizer_files(Path(tokenizer_dir)) if tokenizer_dir is not None else []
    if EMBEDDING not in state:
        raise ConversionError(f"{source}: the checkpoint has no {EMBEDDING}")
    layout = Layout(
        model, arch.hf_values(model), state[EMBEDDING].shape[0], f"{source} (config.model)", kept=dict(kept or {})
    )
    hf_state = arch.to_hf(layout, state)
    ids = _token_ids(Path(tokenizer_dir) if tokenizer_dir is not None else None, token_ids or {})
    config = arch.hf_config(model, ids)
    config.dtype = next(iter(hf_state.values())).dtype
    with staged(out) as tmp:
        config.save_pretrained(str(tmp))
        GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(str(tmp))
        save_safetensors(hf_state, tmp, max_shard_bytes)
        for path in tokenizer_files:
            shutil.copyfile(path, tmp / path.name)
    logger.info("wrote %s (%s)", out, arch.hf_class)
    return out


def _tokenizer_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ConversionError(f"--tokenizer-dir {directory}: tokenizer directory not found")
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not files:
        raise ConversionError(
            f"--tokenizer-dir {directory}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})"
        )
    return files


def _token_ids(tokenizer_dir: Optional[Path], recorded: Mapping) -> dict:
    """bos/eos/pad ids: the tokenizer's, else those the checkpoint recorded; unknown ones are None
    (and said so)."""
    if tokenizer_dir is not None:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            return {key: getattr(tokenizer, key) for key in TOKEN_ID_KEYS}
        except Exception as err:  # noqa: BLE001 - the weights are still worth writing
            logger.warning(
                "%s: could not load the tokenizer (%s); using the token ids the checkpoint records", tokenizer_dir, err
            )
    ids = {key: recorded.get(key) for key in TOKEN_ID_KEYS}
    unknown = [key for key, value in ids.items() if value is None]
    if unknown:
        logger.info(
            "%s unknown (no --tokenizer-dir, and the checkpoint records none): written as null in "
            "config.json, left out of generation_config.json",
            "/".join(unknown),
        )
    return ids
