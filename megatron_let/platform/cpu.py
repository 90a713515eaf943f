"""CPU development/CI mode: the one place where megatron-core is made to run without CUDA.

megatron-core 0.16.1 hard-codes CUDA in a handful of spots (``torch.cuda.current_device()`` in
sequence-parallel mappings, DDP buffers, dist-checkpoint saving and RoPE; ``device="cuda"`` in the
pipeline schedules; the literal type name ``torch.cuda.FloatTensor`` in grad clipping). Rather
than forking megatron, CPU mode patches *torch*:

* ``torch.cuda.current_device()`` answers ``"cpu"`` and ``torch.cuda.synchronize()`` is a no-op;
* megatron's CUDA generator save/restore around activation recompute is a no-op (its CPU
  generator and our CPU RNG tracker are saved and restored as usual);
* a :class:`torch.overrides.TorchFunctionMode` rewrites ``device="cuda"`` arguments and
  ``.cuda()`` / ``.to("cuda")`` to the CPU, and answers ``Tensor.type()`` of a CPU float tensor
  with the CUDA type name megatron's clip-grad assertion expects.

This is only ever enabled by :func:`enable_cpu_mode` (``device: cpu`` in the config). Our own
modules never rely on it: they take devices from their inputs, and their unit tests run without it.
"""

from __future__ import annotations

import logging
import os

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_ENABLED = False
_MODE: "_CudaToCpuMode | None" = None

_CPU_TYPE_AS_CUDA = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Maps every request for a CUDA tensor onto the CPU (CPU mode only)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CPU_TYPE_AS_CUDA.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


def enable_cpu_mode() -> None:
    """Patch torch process-wide so megatron-core's CUDA-only spots run on the CPU. Idempotent."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    if torch.cuda.is_available():
        logger.warning("CPU mode requested on a machine with CUDA: running on the CPU anyway")
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]  # megatron's device arg
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.is_available = lambda: False
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    # Activation recompute saves and restores "the CUDA generator" around the recomputed pass;
    # here the CPU generator (saved by megatron next to it) and our CPU RNG tracker are all there is.
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    megatron_random._set_cuda_rng_state = lambda *a, **k: None
    # The dist-checkpoint writer forks workers; keep them from re-importing CUDA state.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    _ENABLED = True


def init_rng(seed: int) -> None:
    """CPU stand-in for ``model_parallel_cuda_manual_seed``: the same seed for the CPU generator on
    every rank (dropout outside tensor-parallel regions), and megatron's RNG tracker with its
    streams as CPU generator states — the model-parallel one seeded ``seed + 2718 + TP rank``, so
    attention dropout (and sequence-parallel dropout) differs per TP rank as megatron intends
    (:class:`megatron_let.platform.rng.CpuRNGStatesTracker`; call after ``initialize_model_parallel``)."""
    from megatron.core import parallel_state

    from megatron_let.platform.rng import install_cpu_rng_tracker

    torch.manual_seed(seed)
    ranks = {"tp_rank": 0, "ep_rank": 0, "etp_rank": 0}
    if parallel_state.model_parallel_is_initialized():
        ranks = {
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "ep_rank": parallel_state.get_expert_model_parallel_rank(),
            "etp_rank": parallel_state.get_expert_tensor_parallel_rank(),
        }
    install_cpu_rng_tracker(seed, **ranks)
