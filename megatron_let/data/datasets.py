"""Megatron indexed datasets → microbatches, exactly as Megatron-LM feeds them.

``GPTDataset`` through ``BlendedMegatronDatasetBuilder`` (blends, train/valid/test split), and a
sampler that gives DP rank r of microbatch m of a global batch the samples Megatron-LM's
``MegatronPretrainingSampler`` would: resuming from ``consumed_samples`` continues the same order.

As in Megatron-LM, one rank per tensor-parallel group reads and collates (a ``DataLoader`` with
worker processes and pinned memory) and broadcasts each microbatch to the others, which need the
same tokens; data-parallel ranks read their own samples.
"""

from __future__ import annotations

import signal
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import DType
from megatron.core.datasets.utils import get_blend_from_list
from torch.utils.data import DataLoader

from megatron_let.config import InputError, LETConfig


@dataclass
class SpecialTokens:
    """What GPTDataset needs of a tokenizer: its vocabulary size, EOD id and (optional) pad id."""

    vocab_size: int
    eod: int
    pad: int = -1

    @property
    def unique_identifiers(self) -> dict:
        # GPTDataset hashes this into its index-cache key.
        return {"class": "SpecialTokens", "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}


class DataError(InputError):
    """A dataset file is missing, truncated or holds tokens the model cannot embed."""


_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
_SCAN_LIMIT_BYTES = 1 << 30  # .bin files up to this size have every token checked at start-up


def check_indexed_dataset(prefix: str, key: str, vocab_size: int) -> int:
    """Open-time checks of one megatron indexed dataset, each error naming the file: the index is
    complete, the .bin holds every sequence the index points to, and (for .bin files up to 1 GiB;
    larger ones are checked batch by batch) every token id is below ``vocab_size``. Returns its
    number of documents."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (bin_, idx):
        if not path.exists():
            raise DataError(f"{key}: {path} does not exist")
    idx_size = idx.stat().st_size
    with open(idx, "rb") as stream:
        header = stream.read(_INDEX_HEADER_BYTES)
    if len(header) < _INDEX_HEADER_BYTES or header[:9] != _INDEX_MAGIC:
        raise DataError(f"{key}: {idx} is not a megatron index (truncated header or wrong magic)")
    version, code, sequences, documents = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise DataError(f"{key}: {idx}: index version {version}, expected 1")
    try:
        dtype = DType.dtype_from_code(code)
    except Exception:
        raise DataError(f"{key}: {idx}: unknown token dtype code {code}") from None
    needed = _INDEX_HEADER_BYTES + 12 * sequences + 8 * documents
    if idx_size < needed:
        raise DataError(
            f"{key}: {idx} is truncated: {idx_size} bytes, its header promises {sequences} sequences "
            f"and {documents} documents ({needed} bytes)"
        )
    if sequences == 0:
        raise DataError(f"{key}: {idx} holds no sequences")
    index = numpy.memmap(idx, mode="r", dtype=numpy.uint8)
    lengths = numpy.frombuffer(index, dtype=numpy.int32, count=sequences, offset=_INDEX_HEADER_BYTES)
    pointers = numpy.frombuffer(index, dtype=numpy.int64, count=sequences, offset=_INDEX_HEADER_BYTES + 4 * sequences)
    itemsize = numpy.dtype(dtype).itemsize
    end = int(pointers[-1]) + int(lengths[-1]) * itemsize
    bin_size = bin_.stat().st_size
    if bin_size < end:
        raise DataError(f"{key}: {bin_} is truncated: {bin_size} bytes, its index {idx.name} needs {end}")
    if bin_size <= _SCAN_LIMIT_BYTES and end > 0:
        largest = int(numpy.memmap(bin_, mode="r", dtype=dtype, shape=(end // itemsize,)).max())
        if largest >= vocab_size:
            raise DataError(
                f"{key}: {bin_} holds token id {largest}, but model.vocab_size is {vocab_size} "
                "(was it tokenized with another tokenizer?)"
            )
    return documents - 1  # the document index holds documents + 1 offsets


def _check_prefixes(paths: list[str], key: str, vocab_size: int) -> dict[str, int]:
    """check_indexed_dataset on each prefix of a blend; their document counts."""
    documents = {}
    for item in paths:
        try:
            float(item)
            continue  # a blend weight
        except ValueError:
            pass
        documents[item] = check_indexed_dataset(item, key, vocab_size)
    return documents


def _check_split_has_documents(split: str, documents_of: dict[str, int]) -> None:
    """Every split with a share gets at least one document of each dataset: megatron splits each
    dataset's documents by ``split`` and builds every split with a share, and a GPTDataset with no
    document counts epochs forever (even when no sample is drawn from it)."""
    ratios = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix, documents in documents_of.items():
        for name, bounds in zip(("train", "valid", "test"), ratios):
            if bounds is not None and round(bounds[0] * documents) == round(bounds[1] * documents):
                raise DataError(
                    f"data.split: {split!r} leaves the {name} split of {prefix} ({documents} documents) with no "
                    "document (megatron would build it forever): give that split a larger share, or 0"
                )


def build_datasets(cfg: LETConfig, num_samples: tuple[int, int, int]):
    """(train, valid, test) GPTDatasets (None where the split is empty)."""
    eod = cfg.data.eod_token_id if cfg.data.eod_token_id is not None else cfg.model.vocab_size - 1
    tokens = SpecialTokens(vocab_size=cfg.model.vocab_size, eod=eod)
    data = cfg.data
    per_split = [data.train_data_path, data.valid_data_path, data.test_data_path]
    blend, blend_per_split = None, None
    split: Optional[str] = data.split
    if not data.mock_data:
        documents = {}
        for key, paths in zip(
            ("data_path", "train_data_path", "valid_data_path", "test_data_path"), [data.data_path] + per_split
        ):
            documents[key] = _check_prefixes(paths, f"data.{key}", cfg.model.vocab_size)
        if any(per_split):
            blend_per_split, split = [get_blend_from_list(p) if p else None for p in per_split], None
        else:
            blend = get_blend_from_list(data.data_path)
            _check_split_has_documents(data.split, documents["data_path"])
    config = GPTDatasetConfig(
        random_seed=cfg.training.seed,
        sequence_length=cfg.training.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        tokenizer=tokens,
        reset_position_ids=cfg.data.reset_position_ids,
        reset_attention_mask=cfg.data.reset_attention_mask,
        eod_mask_loss=cfg.data.eod_mask_loss,
        create_attention_mask=cfg.data.reset_attention_mask,
        path_to_cache=data.data_cache_path,
        mid_level_dataset_surplus=0.005,
    )
    cls = MockGPTDataset if cfg.data.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, list(num_samples), lambda: True, config).build()


class PretrainingSampler:
    """Yields this DP rank's sample indices, one microbatch at a time, from ``consumed_samples``.

    Megatron-LM's order: each "data-parallel batch" of ``micro_batch_size × dp`` consecutive
    samples is split into contiguous ``micro_batch_size`` chunks, chunk r for DP rank r.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __len__(self) -> int:
        return max(0, self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        span = self.micro_batch_size * self.dp_size
        start = self.consumed_samples
        while start + span <= self.total_samples:
            first = start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
            start += span


def _ignore_exit_signals(_worker_id: int) -> None:
    """DataLoader workers leave Slurm's SIGTERM / SIGUSR1 (sent to every process of the job step) to
    the trainer, which finishes its step — reading from these workers — before it saves and exits."""
    for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def microbatches(
    dataset, sampler: PretrainingSampler, device, num_workers: int = 0, vocab_size: Optional[int] = None
) -> Iterator[dict]:
    """Collated microbatches on ``device``: tokens/labels/loss_mask/position_ids [b, s], and
    sample_index [b] (the samples' global indices in the dataset: a teacher cache's keys). With
    ``vocab_size``, a token id the model cannot embed is an error naming the samples (checked on
    the host, before the transfer: an out-of-range id on the GPU is a device-side assert)."""
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_exit_signals if num_workers > 0 else None,
        # Its own generator: a DataLoader draws a base seed when iterated, which from the global
        # one would shift the dropout stream (and break exact resumes).
        generator=torch.Generator().manual_seed(0),
    )
    for indices, batch in zip(sampler, loader):
        if vocab_size is not None:
            largest = int(torch.maximum(batch["tokens"].max(), batch["labels"].max()))
            if largest >= vocab_size:
                raise DataError(
                    f"data: samples {indices} hold token id {largest}, but model.vocab_size is "
                    f"{vocab_size} (was the data tokenized with another tokenizer?)"
                )
        batch["sample_index"] = torch.tensor(indices, dtype=torch.int64)
        yield {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _broadcast_batch(batch: dict, group, src: int) -> dict:
    """Broadcast a microbatch's tensors in place from ``src``, in one key order for every rank."""
    for key in sorted(batch):
        torch.distributed.broadcast(batch[key], src=src, group=group)
    return batch


def _received_microbatches(template: dict, count: int, device, group, src: int) -> Iterator[dict]:
    """The other tensor-parallel ranks: each microbatch as broadcast by ``src``."""
    for _ in range(count):
        batch = {key: torch.empty(value.shape, dtype=value.dtype, device=device) for key, value in template.items()}
        yield _broadcast_batch(batch, group, src)


def _broadcast_microbatches(batches: Iterator[dict], group, src: int) -> Iterator[dict]:
    for batch in batches:
        yield _broadcast_batch(batch, group, src)


def close_iterators(iterators) -> None:
    """Stop what :func:`make_iterator` started (one iterator or one per model chunk): its DataLoader
    workers are shut down now. They ignore the exit signals, so a worker left to the interpreter's
    exit — which only SIGTERMs daemonic children, then joins them — would hang the process there."""
    for iterator in iterators if isinstance(iterators, list) else [iterators]:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # a generator: its frame, and the DataLoader iterator it holds, go now


def make_iterator(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    device,
    total_samples: Optional[int] = None,
    num_workers: int = 0,
    tp_group=None,
    vocab_size: Optional[int] = None,
) -> Iterator[dict]:
    """This rank's microbatches. With ``tp_group`` (more than one rank), only its first rank reads;
    the others receive what it read (same order, same count: they iterate in lockstep)."""
    total = len(dataset) if total_samples is None else min(total_samples, len(dataset))
    sampler = PretrainingSampler(total, consumed_samples, micro_batch_size, dp_rank, dp_size)
    if tp_group is None or torch.distributed.get_world_size(tp_group) == 1:
        return microbatches(dataset, sampler, device, num_workers, vocab_size)
    src = torch.distributed.get_global_rank(tp_group, 0)
    if torch.distributed.get_rank() == src:
        return _broadcast_microbatches(microbatches(dataset, sampler, device, num_workers, vocab_size), tp_group, src)
    # Shapes and dtypes from one sample: every sample of a GPTDataset has the same.
    sample = dataset[0]
    template = {key: value.unsqueeze(0).expand(micro_batch_size, *value.shape) for key, value in sample.items()}
    template["sample_index"] = torch.zeros(micro_batch_size, dtype=torch.int64)
    return _received_microbatches(template, len(sampler), device, tp_group, src)
