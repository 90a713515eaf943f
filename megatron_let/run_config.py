"""The configuration a run uses: its YAML (:mod:`megatron_let.config`, a leaf that reads no other
file) completed with what only other files can tell — the teacher's architecture, read from its
megatron-let checkpoint or its Hugging Face config — and validated again with it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_let.config import (
    ConfigError,
    LETConfig,
    ModelConfig,
    TeacherConfig,
    check_same_architecture,
    load_config,
    model_config_from_dict,
    validate,
)


def load_run_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> LETConfig:
    """``load_config`` + the teacher's architecture resolved (see :func:`resolve_teacher_model`),
    and a FLOPs budget turned into iterations (training.budget.resolve_budget)."""
    from megatron_let.training.budget import resolve_budget

    cfg = load_config(path, overrides)
    if cfg.teacher is not None:
        where = getattr(cfg, "where", lambda key: "config")
        resolve_teacher_model(cfg.teacher, where)
        validate(cfg, where)
    resolve_budget(cfg)
    return cfg


def resolve_teacher_model(teacher: TeacherConfig, where=lambda key: "config") -> None:
    """Fill teacher.model from its checkpoint (or Hugging Face config), or check they agree."""
    from megatron_let.checkpoint import has_checkpoint

    if teacher.hf_path is not None and not (teacher.load and has_checkpoint(teacher.load)):
        from_hf = hf_model_config(teacher, where)
        if teacher.model is None:
            teacher.model = from_hf
            return
        check_same_architecture(teacher.model, vars(from_hf), f"the Hugging Face model {teacher.hf_path}", where)
        return
    if teacher.load is None:
        if teacher.model is None:
            raise ConfigError(f"{where('teacher')}: teacher: give teacher.load (a checkpoint) or teacher.model")
        return
    saved = checkpoint_model_config(teacher.load, "teacher.load", where)
    if teacher.model is None:
        teacher.model = model_config_from_dict(saved, "teacher.model.", where)
        return
    check_same_architecture(teacher.model, saved, f"the checkpoint {teacher.load}", where)


def hf_model_config(teacher: TeacherConfig, where) -> ModelConfig:
    from megatron_let.platform.resources import resolve_model_path

    try:
        from megatron_let.convert import ConversionError
        from megatron_let.convert import hf_model_config as read_hf_config
    except ImportError as err:
        raise ConfigError(
            f"{where('teacher.hf_path')}: teacher.hf_path needs the Hugging Face extra "
            f"(pip install 'megatron-let[hf]'): {err}"
        ) from None
    try:
        return read_hf_config(resolve_model_path(str(teacher.hf_path)), teacher.gguf_file)
    except (ConversionError, OSError, RuntimeError) as err:
        raise ConfigError(f"{where('teacher.hf_path')}: teacher.hf_path: {err}") from None


def checkpoint_model_config(path: str, key: str, where=lambda key: "config") -> dict:
    """The ``model`` section recorded in a megatron-let checkpoint's common state."""
    from megatron_let.checkpoint import read_common_state

    try:
        common = read_common_state(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{where(key)}: {key}: {err}") from None
    model = (common.get("config") or {}).get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"{where(key)}: {key}: {path} records no model configuration")
    return model
