"""Held-out loss: mean LM loss and perplexity over ``eval.eval_iters`` global batches of the valid
or test split, through megatron's schedule in forward-only mode."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_let.config import LETConfig
from megatron_let.data.datasets import close_iterators


class Evaluator:
    def __init__(
        self,
        cfg: LETConfig,
        model: list,
        datasets: tuple,
        *,
        iterators: Callable,
        forward_step: Callable,
        num_microbatches: int,
        device: torch.device,
    ):
        """``datasets``: (train, valid, test); ``iterators(dataset, consumed)`` makes the data
        iterator(s) the schedule reads; ``forward_step`` is the trainer's."""
        self.cfg = cfg
        self.model = model
        self.splits = {"valid": datasets[1], "test": datasets[2]}
        self.iterators = iterators
        self.forward_step = forward_step
        self.num_microbatches = num_microbatches
        self.device = device

    @torch.no_grad()
    def evaluate(self, split: str, iteration: int) -> Optional[dict]:
        dataset = self.splits[split]
        if dataset is None:
            return None
        data = self.iterators(dataset, 0)
        try:
            totals = self._totals(data)
        finally:
            close_iterators(data)  # its DataLoader workers go now, not at the interpreter's exit
        dist.all_reduce(totals)
        loss = float(totals[0] / totals[1])
        return {"iteration": iteration, "split": split, "lm_loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    def _totals(self, data) -> torch.Tensor:
        """(Σ LM loss, tokens) of this rank over eval_iters global batches, on the device."""
        for chunk in self.model:
            chunk.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # read once, at the end
        for _ in range(self.cfg.eval.eval_iters):
            outputs = get_forward_backward_func()(
                forward_step_func=self.forward_step,
                data_iterator=data,
                model=self.model,
                num_microbatches=self.num_microbatches,
                seq_length=self.cfg.training.seq_length,
                micro_batch_size=self.cfg.training.micro_batch_size,
                forward_only=True,
            )
            if (
                outputs
                and parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                and parallel_state.get_tensor_model_parallel_rank() == 0
            ):
                totals += torch.stack([item["lm loss"] for item in outputs]).to(torch.float64).sum(0)
        for chunk in self.model:
            chunk.train()
        return totals
