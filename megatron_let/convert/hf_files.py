"""Hugging Face checkpoint files: reading weights (safetensors, PyTorch pickles, sharded or not)
with errors that name the file, reading config.json and the special-token ids a checkpoint
records, and writing sharded safetensors."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

import torch

from megatron_let.convert.common import ConversionError
from megatron_let.platform.resources import progress

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN = "pytorch_model.bin"
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def read_json(path: Path, what: str = "JSON") -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: invalid {what}: {err}") from None
    except UnicodeDecodeError:
        raise ConversionError(f"{path}: not a text file (expected {what})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_hf_config(directory: Path) -> dict:
    """config.json as a plain dict (the architecture and what it states explicitly)."""
    if not directory.is_dir():
        raise ConversionError(f"{directory}: no such directory")
    path = directory / "config.json"
    if not path.exists():
        raise ConversionError(f"{path}: missing (a Hugging Face model directory has a config.json)")
    return read_json(path, "config.json")


def recorded_token_ids(directory: Path) -> dict:
    """bos/eos/pad ids that the checkpoint itself states (config.json, else generation_config.json).
    transformers' config classes fill in defaults for absent ids; those are not evidence."""
    found = {}
    for name in ("config.json", "generation_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        for key in TOKEN_ID_KEYS:
            if key not in found and isinstance(data.get(key), (int, list)) and not isinstance(data.get(key), bool):
                found[key] = data[key]
    return found


def gguf_token_ids(path: Path) -> dict:
    """bos/eos/pad ids from a GGUF file's tokenizer metadata (what it states, nothing else)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - ids are a nicety; the weights were already read
        logger.warning("%s: could not read the token ids (%s)", path, err)
        return {}
    found = {}
    for key, field in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        entry = reader.fields.get(field)
        if entry is not None and entry.data:
            found[key] = int(entry.parts[entry.data[0]][0])
    return found


class HFWeights:
    """A Hugging Face checkpoint's tensors by name, read on demand.

    ``base_prefix`` is the base model's attribute (``model.``, ``gpt_neox.``): checkpoints saved
    from the base model class lack it, so names are also tried without it. ``take`` records what
    was used, so that weights nobody asked for can be reported (a mapping that forgot one).
    Every read error names the file.
    """

    def __init__(self, tensors: dict[str, str | torch.Tensor], source: str, base_prefix: str = ""):
        self._where = tensors  # name → file path (lazy) or tensor (already loaded, e.g. from GGUF)
        self.source = source
        self.base_prefix = base_prefix
        self.used: set[str] = set()
        self._open: dict[str, object] = {}

    @classmethod
    def from_directory(cls, directory: Path, base_prefix: str = "") -> "HFWeights":
        for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS), (BIN_INDEX, BIN)):
            index = directory / index_name
            if index.exists():
                weight_map = read_json(index, "weight index").get("weight_map")
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise ConversionError(f"{index}: no weight_map (a dict of tensor name → shard file)")
                missing = sorted({f for f in weight_map.values() if not (directory / f).exists()})
                if missing:
                    raise ConversionError(f"{index}: shard file(s) missing: {', '.join(missing)}")
                return cls({k: str(directory / f) for k, f in weight_map.items()}, str(index), base_prefix)
            if (directory / single).exists():
                path = directory / single
                return cls({k: str(path) for k in _tensor_names(path)}, str(path), base_prefix)
        raise ConversionError(
            f"{directory}: no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX} "
            "(for a GGUF file pass gguf_file=)"
        )

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return self._resolve(name) is not None

    def _resolve(self, name: str) -> Optional[str]:
        candidates = [name]
        if self.base_prefix and name.startswith(self.base_prefix):
            candidates.append(name[len(self.base_prefix) :])
        return next((c for c in candidates if c in self._where), None)

    def file_of(self, name: str) -> str:
        key = self._resolve(name)
        where = self._where.get(key) if key is not None else None
        return where if isinstance(where, str) else self.source

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
        return sorted(k for k in self._where if k not in self.used and not any(p.search(k) for p in patterns))


def _open_safetensors(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for any bad file
        raise ConversionError(f"{path}: cannot read this safetensors file (truncated or corrupt?): {err}") from None


def _tensor_names(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        with _open_safetensors(str(path)) as f:
            return list(f.keys())
    return list(_load_bin(path).keys())


def _load_bin(path: Path) -> dict:
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - files from torch < 1.6 cannot be memory-mapped: read them whole
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many kinds for corrupt files
            raise ConversionError(
                f"{path}: cannot read this PyTorch weights file (truncated or corrupt?): {type(err).__name__}: {err}"
            ) from None
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConversionError(f"{path}: not a state dict (expected a dict of tensor name → tensor)")
    return loaded


def _read_tensor(path: str, key: str, cache: dict) -> torch.Tensor:
    if path not in cache:
        cache[path] = _open_safetensors(path) if path.endswith(".safetensors") else _load_bin(Path(path))
    handle = cache[path]
    if not path.endswith(".safetensors"):
        if key not in handle:
            raise ConversionError(f"{path}: tensor {key!r} (listed in the index) is not in this file")
        return handle[key]
    try:
        return handle.get_tensor(key)
    except Exception as err:  # noqa: BLE001 - a missing key or a damaged data section
        raise ConversionError(f"{path}: cannot read tensor {key!r}: {err}") from None


def save_safetensors(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards and their index
    (huggingface_hub's writer, as transformers' ``save_pretrained`` uses)."""
    from huggingface_hub import save_torch_state_dict

    total = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    with progress(total=total, unit="B", unit_scale=True, desc="writing safetensors", leave=False) as bar:
        save_torch_state_dict(state, out, max_shard_size=max_shard_bytes, metadata={"format": "pt"})
        bar.update(total)
