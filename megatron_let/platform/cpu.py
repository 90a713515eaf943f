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

It is one explicit, scoped switch: ``with cpu_mode(): ...`` (the trainer holds it for its
lifetime when ``device: cpu``; a conversion for its own). Leaving the outermost ``cpu_mode``
restores torch and megatron exactly as they were, so a process can run CPU-mode code and then
other code (a transformers forward, a second trainer) in the same interpreter. Our own modules
never rely on it: they take devices from their inputs, and their unit tests run without it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_depth = 0  # nesting of cpu_mode(); the patches are in place while > 0
_undo: list = []  # how to restore what the outermost cpu_mode() changed, in reverse order

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


def _patch(owner, name: str, value) -> None:
    original = getattr(owner, name)
    setattr(owner, name, value)
    _undo.append(lambda: setattr(owner, name, original))


def _enter() -> None:
    if torch.cuda.is_available():
        logger.warning("CPU mode requested on a machine with CUDA: running on the CPU anyway")
    _patch(torch.cuda, "current_device", lambda: "cpu")  # megatron passes it on as a device
    _patch(torch.cuda, "synchronize", lambda *a, **k: None)
    _patch(torch.cuda, "is_available", lambda: False)
    # Activation recompute saves and restores "the CUDA generator" around the recomputed pass;
    # here the CPU generator (saved by megatron next to it) and our CPU RNG tracker are all there is.
    from megatron.core.tensor_parallel import random as megatron_random

    _patch(megatron_random, "_get_cuda_rng_state", lambda *a, **k: torch.empty(0, dtype=torch.uint8))
    _patch(megatron_random, "_set_cuda_rng_state", lambda *a, **k: None)
    # megatron's RNG tracker is replaced by a CPU one when the process groups are made (init_rng).
    _patch(megatron_random, "_CUDA_RNG_STATE_TRACKER", megatron_random._CUDA_RNG_STATE_TRACKER)
    _patch(megatron_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    # The dist-checkpoint writer forks workers; keep them from re-importing CUDA state.
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        _undo.append(lambda: os.environ.pop("CUDA_VISIBLE_DEVICES", None))
    mode = _CudaToCpuMode()
    mode.__enter__()
    _undo.append(lambda: mode.__exit__(None, None, None))


@contextmanager
def cpu_mode() -> Iterator[None]:
    """Run megatron-core on the CPU inside this block (re-entrant; the outermost exit undoes it)."""
    global _depth
    if _depth == 0:
        try:
            _enter()
        except BaseException:
            _restore()
            raise
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _restore()


def _restore() -> None:
    while _undo:
        _undo.pop()()


def active() -> bool:
    return _depth > 0


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
