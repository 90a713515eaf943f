"""The architectures that convert, by config.json ``model_type``; which one a megatron-let model
exports as."""

from __future__ import annotations

from typing import Optional

from megatron_let.config import ModelConfig
from megatron_let.convert import gpt_neox, llama, opt
from megatron_let.convert.common import ConversionError
from megatron_let.convert.mapping import Architecture

ARCHITECTURES: dict[str, Architecture] = {
    module.ARCHITECTURE.model_type: module.ARCHITECTURE for module in (llama, gpt_neox, opt)
}


def by_model_type(model_type: Optional[str], source: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise ConversionError(
            f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[model_type]


def for_model(model: ModelConfig, source: str) -> Architecture:
    """The one architecture whose config table can express ``model`` (the tables are exclusive:
    RMSNorm → Llama, LayerNorm + RoPE → GPT-NeoX, LayerNorm + learned positions → OPT)."""
    fitting = [a for a in ARCHITECTURES.values() if not a.problems(model)]
    if len(fitting) == 1:
        return fitting[0]
    if not fitting:
        why = "; ".join(f"{name}: {', '.join(a.problems(model))}" for name, a in ARCHITECTURES.items())
        raise ConversionError(f"{source}: this model fits no Hugging Face architecture that exports ({why})")
    raise ConversionError(
        f"{source}: the model fits {', '.join(a.model_type for a in fitting)}: choose one with --architecture"
    )
