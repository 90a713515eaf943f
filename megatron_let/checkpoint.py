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
import re
import shutil
import signal
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

from megatron_let.config import InputError
from megatron_let.model.gpt import unwrap
from megatron_let.platform.files import write_text_atomic

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
_TMP = ".tmp"
_DELETING = ".deleting"
_ITER_DIR = re.compile(r"iter_(\d+)")


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
        _model_key(i, len(model_chunks)): unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model_chunks)
    }


def _rng_layout() -> tuple[int, int]:
    return (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def _rng_object() -> ShardedObject:
    from megatron_let.platform.rng import tracker_states

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        # megatron's RNG tracker streams (model-parallel: attention dropout, per TP rank; data-
        # parallel; expert), CUDA or, in the CPU mode, CPU generator states.
        "tracker": tracker_states(),
    }
    pp, tp = _rng_layout()
    return ShardedObject(
        "rng_state",
        state,
        (pp, tp),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(),
    )


def _sharded_state(model_chunks, optimizer, with_optimizer: bool) -> dict:
    state = _model_state(model_chunks)
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(_model_state(model_chunks), metadata=CONTENT_METADATA)
    state["rng_state"] = _rng_object()
    return state


class CheckpointError(InputError):
    """A checkpoint given to load is incomplete, corrupt or of another model; the message names it."""


_REQUIRED_FILES = ("metadata.json", ".metadata", "common.pt")  # megatron's, torch's (written last), common state


def is_complete(directory: Path) -> bool:
    """A finished dist-checkpoint: renamed from its temp name (so every rank had written) and
    holding megatron's metadata, torch's global ``.metadata`` and the common state."""
    return (
        directory.is_dir()
        and not directory.name.endswith((_TMP, _DELETING))
        and all((directory / name).exists() for name in _REQUIRED_FILES)
    )


def saved_iterations(root: str | Path) -> list[int]:
    """Iterations with a complete checkpoint in ``root``, oldest first."""
    found = []
    for entry in Path(root).glob("iter_*"):
        match = _ITER_DIR.fullmatch(entry.name)
        if match and is_complete(entry):
            found.append(int(match.group(1)))
    return sorted(found)


def remove_stale(root: str | Path) -> list[Path]:
    """Delete what interrupted saves and deletions left behind (``iter_*.tmp``, ``*.deleting``).
    Call only while holding the run lock: another job's save in progress looks the same."""
    stale = [p for p in Path(root).glob("iter_*") if p.name.endswith((_TMP, _DELETING))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _delete_checkpoint(directory: Path) -> None:
    """Rename, then delete: a half-deleted directory never looks like a checkpoint."""
    doomed = directory.with_name(directory.name + _DELETING)
    os.replace(directory, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _write_tracker(root: Path, iteration: int) -> None:
    write_text_atomic(root / TRACKER, f"{iteration}\n")


_WRITER_READY = False
_EXIT_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP}


def _start_writer_immune_to_signals() -> None:
    """megatron's dist-checkpoint writer returns its results through a multiprocessing Manager
    that it spawns on the first save. Slurm signals every process of a job step, so that helper
    dies with the preemption SIGTERM and the very save the signal asked for then fails
    (BrokenPipe / EOFError). Start the helper ourselves with the termination signals blocked:
    the spawned process inherits the mask and never sees them (the trainer's own delivery is
    only deferred until the mask is restored)."""
    global _WRITER_READY
    if _WRITER_READY:
        return
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    blocked = _EXIT_SIGNALS
    # Spawning starts multiprocessing's resource tracker first, which unblocks SIGINT/SIGTERM
    # in this process when it is done: start it before blocking.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        filesystem_async._get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    _WRITER_READY = True


# How the distributed optimizer's state is laid out on disk, pinned in every checkpoint (megatron's
# content metadata) and read back on load, so a checkpoint loads the way it was saved whatever the
# default of a later megatron-core: per-parameter shards in model space, reshardable across TP/PP/DP.
CONTENT_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space"}


def save_checkpoint(
    root: str | Path,
    iteration: int,
    model_chunks: list,
    optimizer,
    scheduler,
    consumed_samples: int,
    config_dict: dict,
    keep_last: Optional[int] = None,
    *,
    fully_parallel: bool = False,
    async_queue=None,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    ``fully_parallel``: megatron's fully parallel save wrapper — replicated tensors (data-parallel
    copies) are written once, their writing spread over the data-parallel ranks.
    ``async_queue`` (megatron's ``AsyncCallsQueue``): the tensors are written by a background
    process while training goes on; the rename from the temp name, the tracker and retention
    happen when the write is finalized (``finalize_async_saves``). Without it, all happen here.

    A complete checkpoint is never removed before its replacement is complete: an iteration that
    is already saved is not written again, and retention (``keep_last``) deletes old ones only
    after the new one and the tracker are in place."""
    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + _TMP)
    already = is_complete(final)  # rank 0 decides; the others follow
    decision = [already]
    dist.broadcast_object_list(decision, src=0)
    if decision[0]:
        if dist.get_rank() == 0:
            _write_tracker(root, iteration)
        dist.barrier()
        return final
    _start_writer_immune_to_signals()
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    # Adam's moments exist only after a step: an iteration-0 checkpoint carries the model alone.
    with_optimizer = optimizer is not None and iteration > 0
    state = _sharded_state(model_chunks, optimizer, with_optimizer)
    state.update(
        {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "has_optimizer": with_optimizer,
            "rng_layout": list(_rng_layout()),
            "opt_param_scheduler": scheduler.state_dict() if scheduler is not None else None,
            "config": config_dict,
        }
    )
    strategy = None
    if fully_parallel:
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        strategy = FullyParallelSaveStrategyWrapper(
            get_default_save_sharded_strategy(),
            parallel_state.get_data_parallel_group(with_context_parallel=True),
            do_cache_distribution=True,
        )

    def finalize() -> None:
        if dist.get_rank() == 0:
            os.replace(tmp, final)
            _write_tracker(root, iteration)
            if keep_last:
                for old in saved_iterations(root)[:-keep_last]:
                    if old != iteration:
                        _delete_checkpoint(iteration_dir(root, old))
        dist.barrier()

    request = dist_checkpointing.save(
        state,
        str(tmp),
        sharded_strategy=strategy,
        async_sharded_save=async_queue is not None,
        content_metadata=CONTENT_METADATA,
    )
    if async_queue is None:
        dist.barrier()
        finalize()
        return final
    request.add_finalize_fn(finalize)  # after megatron's own (its metadata.json)
    # The writer is a forked process, and Slurm signals every process of the job: it starts with
    # the exit signals blocked (inherited), so it finishes the write the trainer's save asked for.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _EXIT_SIGNALS)
    try:
        async_queue.schedule_async_request(request)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return final


def finalize_async_saves(async_queue, blocking: bool) -> list[int]:
    """Collective. Finish the background saves that are done (all, waiting, with ``blocking``):
    each is renamed into place, tracked and retention applied. Returns their call indices."""
    if async_queue is None or async_queue.get_num_unfinalized_calls() == 0:
        return []
    return async_queue.maybe_finalize_async_calls(blocking=blocking)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint root (tracker file and ``iter_*`` directories) or one ``iter_*`` directory →
    the directory to load. When the tracked iteration is missing or incomplete (a kill during a
    save or a deletion), fall back to the newest complete checkpoint, with a warning."""
    path = Path(path)
    if (path / "metadata.json").exists() and not (path / TRACKER).exists():
        missing = [name for name in _REQUIRED_FILES if not (path / name).exists()]
        if missing:
            raise CheckpointError(
                f"{path}: incomplete checkpoint (no {', '.join(missing)}): an interrupted save or copy?"
            )
        return path
    tracked = latest_iteration(path)
    if tracked is not None and is_complete(iteration_dir(path, tracked)):
        return iteration_dir(path, tracked)
    complete = saved_iterations(path)
    if complete:
        newest = complete[-1]
        if tracked is None:
            logger.warning("%s: no %s; loading the newest complete checkpoint, iteration %d", path, TRACKER, newest)
        else:
            logger.warning(
                "%s: %s names iteration %d, whose checkpoint is missing or incomplete; "
                "loading the newest complete one, iteration %d",
                path,
                TRACKER,
                tracked,
                newest,
            )
        return iteration_dir(path, newest)
    if tracked is not None:
        raise FileNotFoundError(
            f"{path}: {TRACKER} names iteration {tracked}, but neither "
            f"{iteration_dir(path, tracked).name} nor any other complete checkpoint exists"
        )
    raise FileNotFoundError(
        f"{path}: not a megatron-let checkpoint (no {TRACKER}, no iter_* directory and no metadata.json)"
    )


def has_checkpoint(path: str | Path) -> bool:
    try:
        resolve_checkpoint(path)
    except (FileNotFoundError, CheckpointError):
        return False
    return True


def _readable(directory: Path, action):
    """Run a read of ``directory``; a truncated or corrupt file becomes one error naming it."""
    try:
        return action()
    except CheckpointError:
        raise
    except (Exception, TorchCheckpointException) as err:  # EOFError, UnpicklingError, megatron's / torch's own
        cause: BaseException = err
        if isinstance(err, TorchCheckpointException) and err.failures:  # a BaseException wrapping each rank's
            cause = next(iter(err.failures.values()))[0]  # (exception, traceback): the first rank's own
        text = str(cause).strip()
        detail = text.splitlines()[0] if text else type(cause).__name__
        raise CheckpointError(
            f"{directory}: cannot read this checkpoint ({type(cause).__name__}: {detail[:300]}); "
            "a truncated or corrupt file?"
        ) from err


def read_common_state(path: str | Path) -> dict:
    """The non-sharded part of a checkpoint (iteration, config, ...), readable without a process group."""
    directory = resolve_checkpoint(path)
    return _readable(directory, lambda: dist_checkpointing.load_common_state_dict(str(directory)))


def load_checkpoint(
    path: str | Path,
    model_chunks: list,
    optimizer,
    scheduler,
    load_optimizer: bool = True,
    common_state: Optional[dict] = None,
    absent_ok: tuple[str, ...] = (),
) -> dict:
    """Collective. Loads model (and optimizer, scheduler, RNG) in place; returns the common
    state (iteration, consumed_samples, config): ``common_state`` if the caller read it already.

    ``absent_ok``: model-key prefixes the checkpoint may lack (parameters a training objective
    adds, e.g. a regressor, when the checkpoint was written by another method): those keep their
    initial values, and the optimizer starts afresh (its saved state does not cover them); the
    common state then says ``"fresh": [the keys]``."""
    directory = resolve_checkpoint(path)
    common = common_state
    if common is None:
        common = _readable(directory, lambda: dist_checkpointing.load_common_state_dict(str(directory)))
    fresh = _absent_keys(directory, model_chunks, absent_ok) if absent_ok else []
    # Every rank loads the optimizer, or none does (the regressor lives on one stage only).
    device = next(unwrap(model_chunks[0]).parameters()).device
    fresh_anywhere = torch.tensor([float(bool(fresh))], device=device)
    if absent_ok and dist.is_initialized():
        dist.all_reduce(fresh_anywhere, op=dist.ReduceOp.MAX)
    with_optimizer = (
        load_optimizer and optimizer is not None and common.get("has_optimizer", False) and not fresh_anywhere.item()
    )
    if with_optimizer:
        # Materialise Adam's moments so there is somewhere to load them into, laid out as saved.
        metadata = dist_checkpointing.load_content_metadata(str(directory)) or {}
        state = _model_state(model_chunks)
        state["optimizer"] = optimizer.sharded_state_dict(
            _model_state(model_chunks), is_loading=True, metadata=metadata
        )
    else:
        state = _model_state(model_chunks)
        for chunk_state in state.values():
            for key in [k for k in chunk_state if k.startswith(absent_ok)] if fresh else []:
                del chunk_state[key]
    # RNG states are per (PP, TP) rank and cannot be resharded: restore them on the same layout only.
    with_rng = with_optimizer and common.get("rng_layout") == list(_rng_layout())
    if with_rng:
        state["rng_state"] = _rng_object()
    loaded = _readable(directory, lambda: dist_checkpointing.load(state, str(directory)))
    for i, chunk in enumerate(model_chunks):
        unwrap(chunk).load_state_dict(loaded[_model_key(i, len(model_chunks))], strict=not fresh)
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    if (with_optimizer or fresh) and scheduler is not None and common.get("opt_param_scheduler"):
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if fresh:
        common = {**common, "fresh": fresh}
    if with_rng:
        rng = loaded["rng_state"]
        random.setstate(rng["random"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        if rng.get("tracker") is not None:  # absent in checkpoints written before it was saved
            from megatron_let.platform.rng import set_tracker_states

            set_tracker_states(rng["tracker"])
    return common


def _absent_keys(directory: Path, model_chunks: list, prefixes: tuple[str, ...]) -> list[str]:
    """The model keys starting with ``prefixes`` that this rank asks for and the checkpoint lacks."""
    saved = _readable(directory, lambda: dist_checkpointing.load_tensors_metadata(str(directory)))
    wanted = [
        key
        for chunk in model_chunks
        for key, item in unwrap(chunk).sharded_state_dict().items()
        if key.startswith(prefixes) and getattr(item, "key", key) not in saved
    ]
    return sorted(set(wanted))


def load_model_weights(path: str | Path, model: Optional[torch.nn.Module]) -> None:
    """Collective over all ranks: weights only, into ``model`` where this rank has one (the
    teacher lives on some ranks only; the others take part with an empty request)."""
    directory = resolve_checkpoint(path)
    request = {"model": model.sharded_state_dict()} if model is not None else {}  # type: ignore[operator]
    # A replicated teacher makes every TP rank claim replica 0 of each tensor: harmless for a
    # read, but megatron's save-side access check would reject it.
    loaded = _readable(
        directory, lambda: dist_checkpointing.load(request, str(directory), validate_access_integrity=False)
    )
    if model is not None:
        model.load_state_dict(loaded["model"])
