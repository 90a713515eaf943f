"""Training checkpoints with megatron dist-checkpointing (resharding across TP/PP on load).

Layout, as in Megatron-LM: ``<dir>/iter_0000100/`` (one dist-checkpoint) and
``<dir>/latest_checkpointed_iteration.txt``. A checkpoint is written to ``iter_XXXXXXX.tmp`` and
renamed once every rank has finished, so an interrupted save never looks like a checkpoint.
The teacher is never saved.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_let.model import unwrap

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> Optional[int]:
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}") from None


def _model_key(index: int, n_chunks: int) -> str:
    return "model" if n_chunks == 1 else f"model{index}"


def _model_state(model_chunks: list) -> dict:
    return {
        _model_key(i, len(model_chunks)): unwrap(chunk).sharded_state_dict()
        for i, chunk in enumerate(model_chunks)
    }


def _rng_layout() -> tuple[int, int]:
    return (parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size())


def _rng_object() -> ShardedObject:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    pp, tp = _rng_layout()
    return ShardedObject(
        "rng_state", state, (pp, tp),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(),
    )


def _sharded_state(model_chunks, optimizer, with_optimizer: bool) -> dict:
    state = _model_state(model_chunks)
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(_model_state(model_chunks))
    state["rng_state"] = _rng_object()
    return state


def save_checkpoint(root: str | Path, iteration: int, model_chunks: list, optimizer, scheduler,
                    consumed_samples: int, config_dict: dict) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    # Adam's moments exist only after a step: an iteration-0 checkpoint carries the model alone.
    with_optimizer = optimizer is not None and iteration > 0
    state = _sharded_state(model_chunks, optimizer, with_optimizer)
    state.update({
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "has_optimizer": with_optimizer,
        "rng_layout": list(_rng_layout()),
        "opt_param_scheduler": scheduler.state_dict() if scheduler is not None else None,
        "config": config_dict,
    })
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        tracker_tmp = root / (TRACKER + ".tmp")
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, root / TRACKER)
    dist.barrier()
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint root (with the tracker file) or one ``iter_*`` directory → the directory."""
    path = Path(path)
    if (path / TRACKER).exists():
        iteration = latest_iteration(path)
        return iteration_dir(path, iteration)
    if (path / "metadata.json").exists():
        return path
    raise FileNotFoundError(f"{path}: not a megatron-let checkpoint (no {TRACKER} and no metadata.json)")


def read_common_state(path: str | Path) -> dict:
    """The non-sharded part of a checkpoint (iteration, config, ...), readable without a process group."""
    return dist_checkpointing.load_common_state_dict(str(resolve_checkpoint(path)))


def load_checkpoint(path: str | Path, model_chunks: list, optimizer, scheduler,
                    load_optimizer: bool = True) -> dict:
    """Collective. Loads model (and optimizer, scheduler, RNG) in place; returns the common
    state (iteration, consumed_samples, config)."""
    directory = resolve_checkpoint(path)
    common = dist_checkpointing.load_common_state_dict(str(directory))
    with_optimizer = load_optimizer and optimizer is not None and common.get("has_optimizer", False)
    if with_optimizer:
        # Materialise Adam's moments so there is somewhere to load them into.
        state = _model_state(model_chunks)
        state["optimizer"] = optimizer.sharded_state_dict(_model_state(model_chunks), is_loading=True)
    else:
        state = _model_state(model_chunks)
    # RNG states are per (PP, TP) rank and cannot be resharded: restore them on the same layout only.
    with_rng = with_optimizer and common.get("rng_layout") == list(_rng_layout())
    if with_rng:
        state["rng_state"] = _rng_object()
    loaded = dist_checkpointing.load(state, str(directory))
    for i, chunk in enumerate(model_chunks):
        unwrap(chunk).load_state_dict(loaded[_model_key(i, len(model_chunks))])
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        if scheduler is not None and common.get("opt_param_scheduler"):
            scheduler.load_state_dict(common["opt_param_scheduler"])
    if with_rng:
        rng = loaded["rng_state"]
        random.setstate(rng["random"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return common


def load_model_weights(path: str | Path, model: Optional[torch.nn.Module]) -> None:
    """Collective over all ranks: weights only, into ``model`` where this rank has one (the
    teacher lives on some ranks only; the others take part with an empty request)."""
    directory = resolve_checkpoint(path)
    request = {"model": model.sharded_state_dict()} if model is not None else {}
    # A replicated teacher makes every TP rank claim replica 0 of each tensor: harmless for a
    # read, but megatron's save-side access check would reject it.
    loaded = dist_checkpointing.load(request, str(directory), validate_access_integrity=False)
    if model is not None:
        model.load_state_dict(loaded["model"])
