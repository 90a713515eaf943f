"""When a run stops early, decided together by all ranks: a signal (Slurm's preemption, time
limit, requeue or scancel reach every process of a job step, not always at once) or
``training.exit_duration_in_mins``."""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_let.config import LETConfig
from megatron_let.platform import signals


class StopConditions:
    def __init__(self, cfg: LETConfig, device: torch.device):
        self.device = device
        self.started = time.monotonic()
        self.duration_limit_s = (
            None if cfg.training.exit_duration_in_mins is None else 60 * cfg.training.exit_duration_in_mins
        )
        self.exit_signal: Optional[str] = None  # the signal that asked this run to stop (any rank's)
        # Noted, and acted on at the end of the current step, after a save.
        signals.listen(cfg.training.exit_signals if cfg.training.exit_signal_handler else ())

    def signalled(self) -> bool:
        """Collective: every rank stops if any rank was signalled."""
        flag = torch.tensor([1.0 if signals.received() else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.exit_signal is None:
            self.exit_signal = signals.received() or "a signal (to another rank)"
        return bool(flag.item() > 0)

    def duration_exceeded(self) -> bool:
        """Megatron-LM's --exit-duration-in-mins, decided by rank 0's clock for all ranks."""
        if self.duration_limit_s is None:
            return False
        flag = torch.tensor([float(time.monotonic() - self.started > self.duration_limit_s)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item() > 0)
