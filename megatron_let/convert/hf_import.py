"""Hugging Face model directory (safetensors / pytorch_model.bin, or a GGUF file) → megatron-let
``ModelConfig`` + full (TP=1) megatron state dict."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from megatron_let.config import ModelConfig
from megatron_let.convert import gpt_neox, llama, opt
from megatron_let.convert.common import ConversionError, HFWeights, full_padded_vocab, pad_vocab, read_hf_config

logger = logging.getLogger(__name__)

ARCHITECTURES = {model_type: module for module in (llama, gpt_neox, opt) for model_type in module.MODEL_TYPES}


def architecture(model_type: Optional[str], source: str):
    if model_type not in ARCHITECTURES:
        raise ConversionError(f"{source}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[model_type]


def hf_model_config(path: str | Path, gguf_file: Optional[str] = None) -> ModelConfig:
    """The megatron-let ModelConfig of a Hugging Face model, from its config alone (no weights)."""
    from transformers import AutoConfig

    path = Path(path)
    if gguf_file is not None:
        file = Path(gguf_file) if Path(gguf_file).is_absolute() else path / gguf_file
        if not file.is_file():
            raise ConversionError(f"{file}: GGUF file not found")
        hf = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
        source = str(file)
    else:
        source = str(path / "config.json")
        read_hf_config(path)  # a clear error for a missing directory or config.json
        hf = AutoConfig.from_pretrained(str(path))
    return architecture(getattr(hf, "model_type", None), source).model_config(hf)


def load_hf(path: str | Path, gguf_file: Optional[str] = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The megatron-let ModelConfig (``vocab_size`` = the HF vocab) and the full TP=1 state dict of
    a Hugging Face checkpoint, named as ``GPTModel.state_dict()`` names them, vocab rows padded with
    zeros to ``padded_vocab_size(vocab_size, make_vocab_size_divisible_by, 1)``.

    ``gguf_file`` (a file name inside ``path``, or a path) goes through transformers'
    ``from_pretrained(..., gguf_file=...)``, which dequantises to fp32; other checkpoints keep
    their stored dtype.
    """
    path = Path(path)
    if gguf_file is not None:
        hf, weights = _gguf(path, gguf_file)
        module = architecture(getattr(hf, "model_type", None), weights.source)
        model = module.model_config(hf)
    else:
        module = architecture(read_hf_config(path).get("model_type"), str(path / "config.json"))
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(str(path))
        model = module.model_config(hf)  # unsupported settings fail here, before any weights are read
        weights = HFWeights.from_directory(path, module.BASE_PREFIX)
    state = module.to_megatron(hf, model, weights)
    leftover = weights.unused(module.IGNORED)
    if leftover:
        raise ConversionError(f"{weights.source}: weights the {module.MODEL_TYPES[0]} mapping does not use: "
                              f"{', '.join(leftover[:10])}{' ...' if len(leftover) > 10 else ''}")
    rows = full_padded_vocab(model)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in state:
            if state[name].shape[0] != model.vocab_size:
                raise ConversionError(f"{weights.source}: {name} has {state[name].shape[0]} rows but the "
                                      f"config says vocab_size={model.vocab_size}")
            state[name] = pad_vocab(state[name], rows)
    return model, {k: v.contiguous() for k, v in state.items()}


def _gguf(directory: Path, gguf_file: str):
    file = Path(gguf_file) if Path(gguf_file).is_absolute() else directory / gguf_file
    if not file.is_file():
        raise ConversionError(f"{file}: GGUF file not found")
    from transformers import AutoModelForCausalLM

    logger.info("reading %s through transformers (dequantised to fp32)", file)
    hf_model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    return hf_model.config, HFWeights(state, str(file))
