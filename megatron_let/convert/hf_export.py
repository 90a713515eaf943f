"""megatron-let checkpoint → Hugging Face Llama directory (config.json, safetensors,
generation_config.json, tokenizer files) that ``AutoModelForCausalLM.from_pretrained`` loads.

Only Llama-style models (RMSNorm, SwiGLU, RoPE, no biases) export; anything else is refused
before any weights are read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from megatron_let.config import ModelConfig
from megatron_let.convert import llama
from megatron_let.convert.common import ConversionError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default shard size


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, tokenizer_dir: Optional[str | Path] = None) -> Path:
    """A megatron-let checkpoint saved at any TP/PP (read at TP=PP=1 in this process) → a Hugging
    Face ``LlamaForCausalLM`` directory. Returns ``out_dir``."""
    from megatron_let.convert.megatron_io import checkpoint_model_config, read_checkpoint

    _, model = checkpoint_model_config(ckpt_dir)
    llama.check_exportable(model)  # before spending time on the weights
    if tokenizer_dir is not None:
        _tokenizer_files(Path(tokenizer_dir))
    model, state = read_checkpoint(ckpt_dir)
    return write_hf(model, state, out_dir, tokenizer_dir)


def write_hf(model: ModelConfig, state: dict[str, torch.Tensor], out_dir: str | Path,
             tokenizer_dir: Optional[str | Path] = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a full (TP=1) megatron state dict as a Hugging Face Llama directory."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    hf_state = llama.to_hf(model, state)
    token_ids = {}
    if tokenizer_dir is not None:
        token_ids = _copy_tokenizer(Path(tokenizer_dir), out)
    config = llama.hf_config(model, **token_ids)
    config.dtype = next(iter(hf_state.values())).dtype
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    GenerationConfig(**{k: v for k, v in token_ids.items() if v is not None}).save_pretrained(str(out))
    _save_safetensors(hf_state, out, max_shard_bytes)
    logger.info("wrote %s", out)
    return out


def _save_safetensors(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    umask = os.umask(0)
    os.umask(umask)

    def save(shard: dict, name: str) -> None:
        save_file(shard, str(out / name), metadata={"format": "pt"})
        os.chmod(out / name, 0o666 & ~umask)  # safetensors creates files 0600 whatever the umask

    if len(shards) == 1:
        save(shards[0], "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save(shard, name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _tokenizer_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ConversionError(f"{directory}: tokenizer directory not found")
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not files:
        raise ConversionError(f"{directory}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    return files


def _copy_tokenizer(directory: Path, out: Path) -> dict:
    """Copy the tokenizer files; return its bos/eos/pad token ids for the configs."""
    out.mkdir(parents=True, exist_ok=True)
    for path in _tokenizer_files(directory):
        shutil.copyfile(path, out / path.name)  # the destination's umask, not the source's mode
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:  # noqa: BLE001 - the weights are still worth writing
        logger.warning("%s: could not load the tokenizer (%s); bos/eos ids left unset", directory, err)
        return {}
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
