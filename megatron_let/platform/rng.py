"""megatron's dropout RNG streams: a CPU implementation of its RNG tracker, and their checkpointing.

megatron-core keeps, besides the default generator, named RNG streams in its "CUDA RNG tracker"
(``tensor_parallel.random.get_cuda_rng_tracker()``), entered with ``tracker.fork(name)``:

* ``model-parallel-rng`` (seed + 2718 + TP rank): dropout inside tensor-parallel regions, which
  differs per TP rank — attention dropout over this rank's heads, and under sequence parallelism
  the hidden / embedding dropout over this rank's sequence shard;
* ``data-parallel-rng`` (seed) and ``expert-parallel-rng`` (seed + 1024 + 100 × EP rank + ETP rank).

Hidden dropout outside those regions draws from the default generator, the same on every TP rank
(the activations are replicated there and must stay identical).

megatron's tracker holds CUDA generator states. In the CPU mode dropout draws from the CPU
generator, so :class:`CpuRNGStatesTracker` keeps the same streams as CPU generator states and
``fork`` swaps them into the CPU generator. Resuming a run exactly needs every stream: the default
generators and :func:`tracker_states` are saved with each checkpoint (``checkpoint._rng_object``).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from megatron.core.tensor_parallel import random as megatron_random

logger = logging.getLogger(__name__)

_DEFAULT = "default-rng"  # megatron's name for "no stream forked"


class CpuRNGStatesTracker(megatron_random.CudaRNGStatesTracker):
    """megatron's ``CudaRNGStatesTracker`` on the CPU generator (same streams, same fork semantics,
    ``get_states`` / ``set_states`` round-trip). Used in the CPU mode only."""

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != _DEFAULT:  # nested fork: park the outer stream where it has got to
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(f"current rng state {self._current_state_name} is not {name}")
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(self.states_[outer_name] if outer_name != _DEFAULT else outer_state)
            self._current_state_name = outer_name


def install_cpu_rng_tracker(seed: int, tp_rank: int = 0, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """Make a :class:`CpuRNGStatesTracker` megatron's RNG tracker, with the streams and seeds of
    ``model_parallel_cuda_manual_seed`` (whose CUDA calls fail without CUDA)."""
    tracker = CpuRNGStatesTracker()
    tracker.add(megatron_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(megatron_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
    # megatron keeps its tracker in these module globals and has no setter for a custom one.
    megatron_random._CUDA_RNG_STATE_TRACKER = tracker
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def tracker_states() -> dict:
    """This rank's tracker streams as plain state tensors (checkpointable), by name."""
    states = megatron_random.get_cuda_rng_tracker().get_states()
    # CUDA-graph-safe trackers hold torch.Generator objects: keep their state tensors.
    return {
        name: megatron_random.convert_cuda_rng_state(state, to_graphable=False).clone()
        for name, state in states.items()
    }


def set_tracker_states(saved: dict) -> None:
    """Restore streams saved by :func:`tracker_states` into the current tracker. Streams the
    tracker does not have are ignored (with a warning); streams it has but ``saved`` lacks keep
    their current state."""
    tracker = megatron_random.get_cuda_rng_tracker()
    current = tracker.get_states()
    unknown = sorted(set(saved) - set(current))
    if unknown:
        logger.warning("checkpoint RNG tracker streams %s are not in this run's tracker: ignored", unknown)
    graph_safe = megatron_random.is_graph_safe_cuda_rng_tracker(tracker)
    for name in current:
        if name in saved:
            state = saved[name]
            current[name] = megatron_random.convert_cuda_rng_state(state, to_graphable=True) if graph_safe else state
    tracker.set_states(current)
