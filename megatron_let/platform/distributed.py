"""Process groups: torch.distributed + megatron's parallel_state, for torchrun launches."""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_let.config import LETConfig
from megatron_let.platform import cluster, cpu

logger = logging.getLogger(__name__)

_SINGLETON_GROUP = None


def init_distributed(cfg: LETConfig) -> None:
    """Initialise torch.distributed from torchrun's environment (or a 1-process world) and
    megatron's tensor × pipeline × data parallel groups."""
    on_cpu = cfg.device == "cpu"
    if not on_cpu:
        # Megatron-LM's setting (before the CUDA context exists): one hardware queue, so tensor- and
        # sequence-parallel communication is issued in program order and overlaps as scheduled.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if on_cpu and not cpu.active():
        raise RuntimeError("device: cpu: initialise inside megatron_let.platform.cpu.cpu_mode() (the Trainer does)")
    if not on_cpu and not torch.cuda.is_available():
        raise RuntimeError("device: cuda, but CUDA is not available (use device: cpu for the CPU mode)")
    cluster.env_from_slurm()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if not on_cpu:
        torch.cuda.set_device(
            cluster.local_device_index(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())
        )
    if not dist.is_initialized():
        if world_size > 1 and not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but no rendezvous address: launch with torchrun, or with srun "
                "inside a Slurm job (MASTER_ADDR / MASTER_PORT are then derived from the job)"
            )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(minutes=cfg.parallel.distributed_timeout_minutes),
        )
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise RuntimeError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size ({tp}) × "
            f"pipeline_model_parallel_size ({pp})"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=cfg.parallel.virtual_pipeline_model_parallel_size,
        create_gloo_process_groups=on_cpu,
    )
    seed_everything(cfg.training.seed, on_cpu)
    _make_singleton_groups()


def seed_everything(seed: int, on_cpu: bool) -> None:
    """Same seed on every rank (weights are initialised from the full tensor, then split)."""
    if on_cpu:
        cpu.init_rng(seed)
    else:
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _make_singleton_groups() -> None:
    """A one-rank group per rank, for modules that must not communicate (a replicated teacher).
    new_group is collective, so every rank creates every group."""
    global _SINGLETON_GROUP
    for r in range(dist.get_world_size()):
        group = dist.new_group([r])
        if r == dist.get_rank():
            _SINGLETON_GROUP = group


def singleton_group():
    assert _SINGLETON_GROUP is not None, "init_distributed() first"
    return _SINGLETON_GROUP


def world_info() -> dict:
    return {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "dp_size": parallel_state.get_data_parallel_world_size(),
    }


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
