"""CPU mode is one scoped switch: inside ``cpu_mode()`` megatron's CUDA-only spots run on the CPU;
leaving the outermost block restores torch and megatron exactly (a process can go on to run other
code — a transformers forward, a conversion, a second trainer)."""

import pytest
import torch
from megatron.core.tensor_parallel import random as megatron_random

from megatron_let.platform import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour outside the mode")


def _originals():
    return (
        torch.cuda.current_device,
        torch.cuda.synchronize,
        torch.cuda.is_available,
        megatron_random._get_cuda_rng_state,
        megatron_random._set_cuda_rng_state,
        megatron_random._CUDA_RNG_STATE_TRACKER,
    )


def test_cpu_mode_maps_cuda_requests_and_is_undone_on_exit():
    before = _originals()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")  # no CUDA here: outside the mode this fails
    with cpu.cpu_mode():
        assert cpu.active()
        assert torch.cuda.current_device() == "cpu"
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(2).cuda().device.type == "cpu"
        assert torch.ones(2).to("cuda").device.type == "cpu"
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"  # what megatron's grad clipping asserts
        megatron_random._set_cuda_rng_state(torch.empty(0))  # a no-op, not a CUDA call
        with cpu.cpu_mode():  # re-entrant: the inner exit changes nothing
            pass
        assert cpu.active() and torch.zeros(1, device="cuda").device.type == "cpu"
    assert not cpu.active()
    assert _originals() == before
    assert torch.ones(2).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_cpu_mode_is_undone_when_its_block_raises():
    before = _originals()
    with pytest.raises(KeyError):
        with cpu.cpu_mode():
            raise KeyError("boom")
    assert not cpu.active() and _originals() == before


def test_process_groups_refuse_the_cpu_device_outside_cpu_mode():
    from megatron_let.config import LETConfig
    from megatron_let.platform import distributed

    with pytest.raises(RuntimeError, match="cpu_mode"):
        distributed.init_distributed(LETConfig(device="cpu"))
