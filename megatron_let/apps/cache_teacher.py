"""``megatron-let cache-teacher``: run the teacher once over a run's training samples and store its
top-k logits (:mod:`megatron_let.data.teacher_cache`), so that logit distillation reads them
instead of running the teacher (``distillation.teacher_cache: DIR``).

    megatron-let cache-teacher --config examples/kd_smollm2_135m.yaml --output cache/ \\
        [--top-k 128] [--dtype bf16|fp16|fp32] [--shard-samples 1024] [--micro-batch-size 4] [--set KEY=VALUE ...]

The run's config says everything else: the teacher (``teacher:``), the data and its sample order
(``data:``, ``training.seed / seq_length / train_iters × global_batch_size``), the device. Under
torchrun (or srun) the shards are split across the processes, each holding a whole teacher.
Resumable: shards already written are kept, so an interrupted cache is finished by running the same
command again. Prints the storage cost in bytes per token.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_let.config import InputError, LETConfig
from megatron_let.data import teacher_cache
from megatron_let.data.datasets import build_datasets
from megatron_let.distillation import top_k_logits
from megatron_let.model.gpt import Kernels, use_transformer_engine
from megatron_let.objectives.teacher import Teacher, load_teacher_weights
from megatron_let.platform import cpu
from megatron_let.platform import distributed as parallel
from megatron_let.platform.files import write_text_atomic


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-let cache-teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's YAML config (teacher:, data:, training:)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--output", required=True, help="the cache directory (created; an existing one is resumed)")
    parser.add_argument("--top-k", type=int, default=None, help="logits kept per token (default: distillation.top_k)")
    parser.add_argument("--dtype", choices=sorted(teacher_cache.DTYPES), default="bf16", help="storage of the values")
    parser.add_argument("--shard-samples", type=int, default=1024, help="samples per shard file")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="(default: training.micro_batch_size)")
    return parser.parse_args(argv)


def _manifest(cfg: LETConfig, top_k: int, dtype: str, shard_samples: int) -> dict:
    samples = cfg.training.train_iters * cfg.training.global_batch_size
    teacher = cfg.teacher
    assert teacher is not None
    return {
        "format": teacher_cache.FORMAT,
        "top_k": top_k,
        "dtype": dtype,
        "shard_samples": shard_samples,
        "num_samples": samples,
        "num_shards": math.ceil(samples / shard_samples),
        "vocab_size": cfg.model.vocab_size,
        "seq_length": cfg.training.seq_length,
        "data": teacher_cache.data_fingerprint(cfg),
        "teacher": {"load": teacher.load, "hf_path": teacher.hf_path, "gguf_file": teacher.gguf_file},
    }


def _start(directory: Path, manifest: dict, writer: bool) -> None:
    """Check that an existing cache is this one (every rank: all refuse together), or write a new
    cache's manifest (``writer``, rank 0)."""
    path = directory / "cache.json"
    if path.exists():
        existing = teacher_cache.read_manifest(directory)
        for key, value in manifest.items():
            if existing.get(key) != value:
                raise teacher_cache.CacheError(
                    f"--output {directory}: holds a cache with {key}={existing.get(key)!r}, this one has {value!r}: "
                    "use another directory"
                )
    if not writer:
        return
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(manifest, indent=1) + "\n")
    for leftover in directory.glob("shard_*.pt.partial-*"):  # from a writer killed mid-shard
        leftover.unlink(missing_ok=True)


def write_shard(teacher: Teacher, dataset, shard: int, manifest: dict, micro_batch: int, device) -> int:
    """Compute and write one shard; returns its sample count."""
    first = shard * manifest["shard_samples"]
    last = min(first + manifest["shard_samples"], manifest["num_samples"])
    values, indices = [], []
    for start in range(first, last, micro_batch):
        samples = [dataset[i] for i in range(start, min(start + micro_batch, last))]
        tokens = torch.stack([s["tokens"] for s in samples]).to(device)
        positions = torch.stack([s["position_ids"] for s in samples]).to(device)
        mask = (
            torch.stack([s["attention_mask"] for s in samples]).to(device) if "attention_mask" in samples[0] else None
        )
        logits = teacher.logits(tokens, positions, mask)  # [s, b, V_padded]
        top_values, top_indices = top_k_logits(logits, manifest["top_k"], manifest["vocab_size"])
        values.append(top_values.transpose(0, 1).to(teacher_cache.DTYPES[manifest["dtype"]]).cpu())
        indices.append(top_indices.transpose(0, 1).to(torch.int32).cpu())
    path = teacher_cache.shard_path(Path(manifest["directory"]), shard)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    torch.save({"values": torch.cat(values), "indices": torch.cat(indices)}, partial)
    os.replace(partial, path)
    return last - first


def cache_teacher(cfg: LETConfig, directory: Path, top_k: int, dtype: str, shard_samples: int, micro_batch: int) -> int:
    teacher_cfg = cfg.teacher
    if teacher_cfg is None:
        raise InputError("--config: the config has no teacher: section to cache")
    if not 1 <= top_k <= cfg.model.vocab_size:
        raise InputError(f"--top-k: must be in [1, model.vocab_size={cfg.model.vocab_size}], got {top_k}")
    if shard_samples < 1 or micro_batch < 1:
        raise InputError("--shard-samples and --micro-batch-size must be >= 1")
    # Each process holds a whole teacher; the shards are its data parallelism.
    cfg = dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(
            cfg.parallel,
            tensor_model_parallel_size=1,
            pipeline_model_parallel_size=1,
            virtual_pipeline_model_parallel_size=None,
            sequence_parallel=False,
        ),
    )
    on_cpu = cfg.device == "cpu"
    parallel.init_distributed(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
    manifest = _manifest(cfg, top_k, dtype, shard_samples)
    _start(directory, manifest, writer=rank == 0)
    dist.barrier()
    manifest["directory"] = str(directory)
    todo = [i for i in range(manifest["num_shards"]) if not teacher_cache.shard_path(directory, i).exists()]
    mine = todo[rank::world]

    log = print if rank == 0 else (lambda *_: None)
    teacher = Teacher(
        teacher_cfg,
        teacher_layer=None,
        on_cpu=on_cpu,
        use_te=use_transformer_engine(cfg.training.transformer_impl, on_cpu),
        seed=cfg.training.seed + 1,
        kernels=Kernels(),
    )
    load_teacher_weights(teacher_cfg, teacher, log)
    dataset = build_datasets(cfg, (manifest["num_samples"], 0, 0))[0]
    done = manifest["num_shards"] - len(todo)
    log(
        f"teacher cache {directory}: {manifest['num_samples']} samples × {manifest['seq_length']} tokens in "
        f"{manifest['num_shards']} shards ({done} already written, {len(todo)} to write on {world} process(es))"
    )
    from tqdm import tqdm

    started = time.time()
    with tqdm(total=sum(min(shard_samples, manifest["num_samples"] - i * shard_samples) for i in mine),
              unit="sample", disable=rank != 0, file=sys.stdout) as progress:  # fmt: skip
        for shard in mine:
            progress.update(write_shard(teacher, dataset, shard, manifest, micro_batch, device))
    teacher.release()
    dist.barrier()
    per_token = top_k * (teacher_cache.DTYPES[dtype].itemsize + 4)
    total = manifest["num_samples"] * manifest["seq_length"] * per_token
    log(
        f"done in {time.time() - started:.1f} s: top-{top_k} logits ({dtype} values, int32 ids) = "
        f"{per_token} bytes per token, {total / 2**20:.1f} MiB for {manifest['num_samples'] * manifest['seq_length']} tokens"
    )
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_let.run_config import load_run_config

    try:
        cfg = load_run_config(args.config, args.set)
        top_k = args.top_k or cfg.distillation.top_k or 128
        micro_batch = args.micro_batch_size or cfg.training.micro_batch_size
        with cpu.cpu_mode() if cfg.device == "cpu" else contextlib.nullcontext():
            try:
                return cache_teacher(cfg, Path(args.output), top_k, args.dtype, args.shard_samples, micro_batch)
            finally:
                parallel.shutdown()
    except InputError as err:
        print(f"megatron-let cache-teacher: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
