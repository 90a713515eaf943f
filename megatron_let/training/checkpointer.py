"""A run's checkpoints: the lock on ``checkpoint.save``, resuming from ``checkpoint.load``,
periodic / final saves (optionally in the background, megatron's ``--async-save``), and the
record of how the run ended that the sbatch scripts read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from megatron_let import checkpoint
from megatron_let.config import LETConfig, check_same_architecture, to_dict
from megatron_let.platform import cluster
from megatron_let.platform.files import write_text_atomic


def lock_checkpoint_directory(cfg: LETConfig, log) -> Optional[cluster.RunLock]:
    """Rank 0 takes ``checkpoint.save``'s lock (and clears what killed saves left there);
    every rank learns the outcome, so a refused lock stops all of them at once."""
    save = cfg.checkpoint.save
    if not save:
        return None
    lock, error = None, None
    if dist.get_rank() == 0:
        try:
            lock = cluster.RunLock(save)
            lock.acquire()
            for stale in checkpoint.remove_stale(save):
                log(f"removed {stale} (left by an interrupted save)")
        except cluster.LockHeld as err:
            error = str(err)
    outcome = [error]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise cluster.LockHeld(f"checkpoint.save: {outcome[0]}")
    return lock


class Checkpointer:
    """Saves and loads the target (model chunks, optimizer, scheduler, RNG, consumed samples)."""

    def __init__(self, cfg: LETConfig, model: list, optimizer, scheduler, log, objective_modules: tuple[str, ...] = ()):
        """``objective_modules``: key prefixes of what the objective adds to the model, which a
        checkpoint written by another method may lack."""
        self.cfg = cfg
        self.objective_modules = objective_modules
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.log = log
        self.saved_iteration: Optional[int] = None  # the iteration already on disk
        self.async_queue = AsyncCallsQueue() if cfg.checkpoint.async_save else None
        self.pending: list = []  # checkpoints being written in the background, oldest first

    def resume(self) -> tuple[int, int]:
        """(iteration, consumed samples) of ``checkpoint.load``'s latest checkpoint, loaded into
        the model, optimizer and scheduler; (0, 0) for a new run."""
        ck = self.cfg.checkpoint
        if not ck.load:
            return 0, 0
        try:
            directory = checkpoint.resolve_checkpoint(ck.load)
        except FileNotFoundError:  # nothing there yet (an incomplete checkpoint is a CheckpointError)
            if ck.save and Path(ck.load).resolve() == Path(ck.save).resolve():
                self.log(f"no checkpoint in {ck.load} yet: starting from scratch")
                return 0, 0
            raise checkpoint.CheckpointError(f"checkpoint.load: {ck.load} holds no megatron-let checkpoint") from None
        except checkpoint.CheckpointError as err:
            raise checkpoint.CheckpointError(f"checkpoint.load: {err}") from None
        try:
            common = checkpoint.read_common_state(directory)
            # The same model, or refuse: a different vocabulary (say) may even fit the padded shapes.
            check_same_architecture(
                self.cfg.model,
                (common.get("config") or {}).get("model") or {},
                f"the checkpoint {directory} (checkpoint.load)",
                getattr(self.cfg, "where", lambda key: "config"),
                prefix="model",
            )
            common = checkpoint.load_checkpoint(
                directory,
                self.model,
                self.optimizer,
                self.scheduler,
                common_state=common,
                absent_ok=self.objective_modules,
            )
        except checkpoint.CheckpointError as err:
            raise checkpoint.CheckpointError(f"checkpoint.load: {err}") from None
        iteration = int(common["iteration"])
        if ck.save and Path(ck.save).resolve() == directory.parent.resolve():
            self.saved_iteration = iteration  # already on disk: never written again
        self.log(f"loaded checkpoint {directory} at iteration {iteration}")
        if common.get("fresh"):
            self.log(
                f"the checkpoint has no {', '.join(common['fresh'])} (written by another method): "
                "initialised afresh, and the optimizer's state starts afresh too"
            )
        return iteration, int(common["consumed_samples"])

    def save(self, iteration: int, consumed_samples: int) -> None:
        """Write ``iteration``'s checkpoint unless it is on disk already (at most one background
        save in flight: an earlier one is finished first)."""
        ck = self.cfg.checkpoint
        if not ck.save or self.saved_iteration == iteration:
            return
        self.finish(blocking=True)
        path = checkpoint.save_checkpoint(
            ck.save,
            iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            consumed_samples,
            to_dict(self.cfg),
            keep_last=ck.keep_last,
            fully_parallel=ck.fully_parallel_save,
            async_queue=self.async_queue,
        )
        self.saved_iteration = iteration
        if self.async_queue is None:
            self.log(f"saved checkpoint {path}")
        else:
            self.pending.append(path)
            self.log(f"writing checkpoint {path} in the background")

    def finish(self, blocking: bool) -> None:
        """Background saves that have finished appear now (renamed, tracked); ``blocking`` waits."""
        if not self.pending:
            return
        for _ in checkpoint.finalize_async_saves(self.async_queue, blocking=blocking):
            self.log(f"saved checkpoint {self.pending.pop(0)}")

    def record_exit(self, status: str, iteration: int, signal: Optional[str]) -> None:
        """``MEGATRON_LET_EXIT_STATE`` (set by the sbatch scripts) names a file that gets how the run
        ended, which tells the script whether to requeue the job: ``interrupted`` (a signal or the
        duration limit, before train_iters) → requeue; ``finished`` / ``exit_interval`` → done."""
        path = os.environ.get("MEGATRON_LET_EXIT_STATE")
        if path and dist.get_rank() == 0:
            state = {
                "status": status,
                "iteration": iteration,
                "train_iters": self.cfg.training.train_iters,
                "signal": signal,
                "checkpoint": self.cfg.checkpoint.save,
            }
            write_text_atomic(path, json.dumps(state) + "\n")
