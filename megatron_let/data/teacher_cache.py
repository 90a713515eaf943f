"""The offline teacher cache: the teacher's top-k logits for every training sample, on disk.

Written once by ``megatron-let cache-teacher`` (:mod:`megatron_let.apps.cache_teacher`), read by
logit distillation (``distillation.teacher_cache``) instead of running a teacher. Keyed to
megatron's sample order: entry i is the training dataset's sample i — what the trainer's sampler
hands out as global sample index i (``batch["sample_index"]``), whatever the data-parallel size —
so the order is only valid for the same data, split, seed, sequence length and number of training
samples: :func:`data_fingerprint` is stored and checked.

Layout of a cache directory::

    cache.json              what it holds: format, top_k, dtype, shard_samples, num_samples,
                            vocab_size, seq_length, the data fingerprint, the teacher
    shard_000000.pt         samples [0, shard_samples): {"values": [n, s, k] (dtype), "indices": [n, s, k] int32}
    shard_000001.pt         ...

Values are the teacher's raw logits (τ = 1) of its k largest real-vocabulary columns, sorted
descending (so a run may use any k' ≤ k: the first k'); indices are global vocabulary ids. Each
shard is written to a temporary name and renamed: a shard that exists is complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from megatron_let.config import InputError, LETConfig

FORMAT = 1
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class CacheError(InputError):
    """A teacher cache that does not fit the run (names the file and what differs)."""


def data_fingerprint(cfg: LETConfig) -> dict:
    """What fixes megatron's training-sample order: the same values give the same samples."""
    data = cfg.data
    return {
        "data_path": list(data.data_path or []),
        "train_data_path": list(data.train_data_path or []),
        "split": data.split,
        "mock_data": data.mock_data,
        "seed": cfg.training.seed,
        "seq_length": cfg.training.seq_length,
        "train_samples": cfg.training.train_iters * cfg.training.global_batch_size,
    }


def shard_path(directory: Path, shard: int) -> Path:
    return directory / f"shard_{shard:06d}.pt"


def read_manifest(directory: Path) -> dict:
    path = directory / "cache.json"
    if not path.exists():
        raise CacheError(f"{path}: no teacher cache here (write one with megatron-let cache-teacher)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise CacheError(f"{path}: not a teacher-cache manifest ({err})") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT}")
    return manifest


def check_fits(manifest: dict, directory: Path, cfg: LETConfig, top_k: Optional[int], key: str) -> None:
    """The cache serves this run: its sample order, enough samples, k and vocabulary."""
    where = directory / "cache.json"
    expected = data_fingerprint(cfg)
    for name, value in expected.items():
        have = manifest["data"].get(name)
        # A cache over more training samples than this run needs has another sample order, except
        # that the first samples agree only when megatron builds the same index: demand equality.
        if have != value:
            raise CacheError(
                f"{key}: {where}: written for {name}={have!r}, this run has {name}={value!r}: "
                "the samples would not match (write the cache with this run's config)"
            )
    if top_k is None:
        raise CacheError(f"{key}: a cache holds the teacher's top-{manifest['top_k']} only: set distillation.top_k")
    if top_k > manifest["top_k"]:
        raise CacheError(f"{key}: {where} holds the top {manifest['top_k']} logits, distillation.top_k={top_k}")
    if manifest["vocab_size"] != cfg.model.vocab_size:
        raise CacheError(
            f"{key}: {where}: vocabulary {manifest['vocab_size']}, model.vocab_size={cfg.model.vocab_size}"
        )
    missing = [i for i in range(manifest["num_shards"]) if not shard_path(directory, i).exists()]
    if missing:
        raise CacheError(
            f"{key}: {directory} is incomplete: {len(missing)} of {manifest['num_shards']} shards missing "
            f"(first: {shard_path(directory, missing[0]).name}); rerun megatron-let cache-teacher to finish it"
        )


class TeacherCache:
    """Reads the cached top-k logits of given training samples."""

    def __init__(self, directory: str | Path, cfg: LETConfig, top_k: Optional[int], key: str):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        check_fits(self.manifest, self.directory, cfg, top_k, key)
        self.top_k = top_k
        self.shard_samples = self.manifest["shard_samples"]
        self._open: dict[int, dict] = {}  # memory-mapped shards

    def _shard(self, shard: int) -> dict:
        if shard not in self._open:
            self._open[shard] = torch.load(shard_path(self.directory, shard), mmap=True, weights_only=True)
        return self._open[shard]

    def lookup(self, sample_indices: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each [b, s, k], of samples ``sample_indices`` [b]."""
        values, indices = [], []
        for sample in sample_indices.tolist():
            shard = self._shard(sample // self.shard_samples)
            row = sample % self.shard_samples
            values.append(shard["values"][row, :, : self.top_k])
            indices.append(shard["indices"][row, :, : self.top_k])
        return (
            torch.stack(values).to(device, non_blocking=True),
            torch.stack(indices).to(device, torch.int64, non_blocking=True),
        )
