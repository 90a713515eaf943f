"""What every architecture's conversion shares: reading a Hugging Face checkpoint, megatron's fused
layouts (QKV per query group, gate/up in ``linear_fc1``), vocab padding and tensor-parallel splits.

Megatron names throughout are those of ``GPTModel.state_dict()`` at TP=1 with megatron-let's layer
specs (``decoder.layers.3.self_attention.linear_qkv.weight`` ...).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

import torch

from megatron_let.config import ModelConfig
from megatron_let.model import padded_vocab_size

logger = logging.getLogger(__name__)


class ConversionError(ValueError):
    """A checkpoint cannot be converted. The message names the file and the key or setting."""


# ---------------------------------------------------------------------------------------------
# Reading a Hugging Face checkpoint

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS = "model.safetensors"
_BIN_INDEX = "pytorch_model.bin.index.json"
_BIN = "pytorch_model.bin"


def read_hf_config(directory: Path) -> dict:
    """config.json as a plain dict (only to find the architecture before transformers parses it)."""
    if not directory.is_dir():
        raise ConversionError(f"{directory}: no such directory")
    path = directory / "config.json"
    if not path.exists():
        raise ConversionError(f"{path}: missing (a Hugging Face model directory has a config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: invalid JSON: {err}") from None


class HFWeights:
    """A Hugging Face checkpoint's tensors by name, read on demand.

    ``base_prefix`` is the base model's attribute (``model.``, ``gpt_neox.``): checkpoints saved
    from the base model class lack it, so names are also tried without it. ``take`` records what
    was used, so that weights nobody asked for can be reported (a mapping that forgot one).
    """

    def __init__(self, tensors: dict[str, str | torch.Tensor], source: str, base_prefix: str = ""):
        self._where = tensors  # name → file path (lazy) or tensor (already loaded, e.g. from GGUF)
        self.source = source
        self.base_prefix = base_prefix
        self.used: set[str] = set()
        self._open: dict[str, object] = {}

    @classmethod
    def from_directory(cls, directory: Path, base_prefix: str = "") -> "HFWeights":
        for index_name, single in ((_SAFETENSORS_INDEX, _SAFETENSORS), (_BIN_INDEX, _BIN)):
            index = directory / index_name
            if index.exists():
                weight_map = json.loads(index.read_text()).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ConversionError(f"{index}: no weight_map")
                missing = sorted({f for f in weight_map.values() if not (directory / f).exists()})
                if missing:
                    raise ConversionError(f"{index}: shard file(s) missing: {', '.join(missing)}")
                return cls({k: str(directory / f) for k, f in weight_map.items()}, str(index), base_prefix)
            if (directory / single).exists():
                path = directory / single
                return cls({k: str(path) for k in _tensor_names(path)}, str(path), base_prefix)
        raise ConversionError(
            f"{directory}: no weights: expected {_SAFETENSORS}, {_SAFETENSORS_INDEX}, {_BIN} or {_BIN_INDEX} "
            "(for a GGUF file pass gguf_file=)")

    def __contains__(self, name: str) -> bool:
        return self._resolve(name) is not None

    def _resolve(self, name: str) -> Optional[str]:
        candidates = [name]
        if self.base_prefix and name.startswith(self.base_prefix):
            candidates.append(name[len(self.base_prefix):])
        return next((c for c in candidates if c in self._where), None)

    def take(self, name: str) -> torch.Tensor:
        key = self._resolve(name)
        if key is None:
            raise ConversionError(f"{self.source}: weight {name!r} not found")
        self.used.add(key)
        where = self._where[key]
        if isinstance(where, torch.Tensor):
            return where
        return _read_tensor(where, key, self._open)

    def unused(self, ignore: tuple[str, ...] = ()) -> list[str]:
        patterns = [re.compile(p) for p in ignore]
        return sorted(k for k in self._where
                      if k not in self.used and not any(p.search(k) for p in patterns))


def _tensor_names(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(_load_bin(path).keys())


def _load_bin(path: Path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - files from torch < 1.6 cannot be memory-mapped: read them whole
        pass
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for corrupt files
        raise ConversionError(f"{path}: cannot read: {err}") from None


def _read_tensor(path: str, key: str, cache: dict) -> torch.Tensor:
    if path not in cache:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            cache[path] = safe_open(path, framework="pt")
        else:
            cache[path] = _load_bin(Path(path))
    handle = cache[path]
    return handle.get_tensor(key) if path.endswith(".safetensors") else handle[key]


# ---------------------------------------------------------------------------------------------
# Settings read from a transformers config object (both transformers 4.x and 5.x spellings)


def rope_settings(hf) -> dict:
    """``rope_type``, ``rope_theta``, ``partial_rotary_factor`` and any scaling parameters.

    transformers 5 keeps them in ``rope_parameters``; 4.x in ``rope_theta``/``rope_scaling``
    (GPT-NeoX: ``rotary_emb_base``/``rotary_pct``)."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ConversionError(f"{_name(hf)}: per-layer-type RoPE parameters are not supported")
    params.setdefault("rope_type", params.pop("type", "default"))
    theta = getattr(hf, "rope_theta", None) or getattr(hf, "rotary_emb_base", None) or 10000.0
    params.setdefault("rope_theta", theta)
    partial = getattr(hf, "partial_rotary_factor", None) or getattr(hf, "rotary_pct", None) or 1.0
    params.setdefault("partial_rotary_factor", partial)
    return params


def rotary_base(hf, theta: float) -> int:
    """megatron's ``rotary_base`` is an int."""
    if float(theta) != int(theta):
        raise ConversionError(f"{_name(hf)}: rope_theta={theta} is not an integer (megatron's rotary_base is)")
    return int(theta)


def _name(hf) -> str:
    return getattr(hf, "_name_or_path", None) or getattr(hf, "model_type", "config")


def unsupported(hf, setting: str, value, why: str = "") -> ConversionError:
    return ConversionError(f"{_name(hf)}: {setting}={value!r} is not supported{': ' + why if why else ''}")


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


def shard_state_dict(full: dict[str, torch.Tensor], model_config: ModelConfig, tp_rank: int,
                     tp_size: int) -> dict[str, torch.Tensor]:
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
        raise ConversionError(f"tensor parallel size {tp_size} does not divide {model_config.num_attention_heads} "
                              f"heads / {groups} query groups")
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
        raise ConversionError(f"state dict does not fit the model: missing {missing}, "
                              f"unexpected {list(result.unexpected_keys)}")

