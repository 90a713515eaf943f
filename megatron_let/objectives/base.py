"""The objective interface, and the plain LM objective (NLL)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_let.config import LETConfig
from megatron_let.flops import Convention, CostSchedule, TokenCost, student_flops_per_token

# What an objective's forward returns as the LM loss to report when it computed none (HLDF's
# phase 1 stops before the output layer): the step's lm loss is then not measured.
NOT_COMPUTED = object()


@dataclass(frozen=True)
class PhasedSchedule:
    """A run in two phases with their own lr schedules (HLDF): iterations 1..``boundary`` warm up
    over ``phase1_warmup`` iterations, then hold the peak lr, the parameters marked with attribute
    ``frozen_attr`` at lr 0; then the run's schedule (warm-up and decay) over the rest."""

    boundary: int
    phase1_warmup: int
    frozen_attr: str


class Objective:
    """The interface, and the plain LM objective (NLL): every hook is a no-op."""

    name = "nll"
    # (Σ value·tokens, …, tokens) sums an objective reports per step, as the record keys they
    # become (token-weighted means over ranks). Always in the record, None when not measured.
    metric_keys: tuple[str, ...] = ("alignment_loss", "cosine_similarity")
    # How the log line names them, and the step's weight (printed while it is > 0 or a metric is measured).
    metric_labels: dict[str, str] = {"alignment_loss": "alignment loss", "cosine_similarity": "cos sim"}
    weight_label = "λ"

    def begin_step(self, iteration: int) -> float:
        """Called before each training step (``iteration``: the steps done so far, i.e. Eq. 5's
        s); returns the weight of the objective's own loss term at this step (0: inactive)."""
        return 0.0

    def forward(
        self, model_chunk, batch: dict, weight: float, evaluating: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One microbatch through one model chunk of this rank: ``(output, nll)``. ``output`` is
        what megatron's schedule takes — the hidden states for the next stage, or on the last
        stage the per-token loss ``[b, s]`` to minimise; ``nll`` is the per-token LM loss to report
        when it differs from that loss (else None)."""
        self.before_forward(model_chunk, batch, weight, evaluating)
        output = model_chunk(
            batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"]
        )
        return output, None

    def before_forward(self, model_chunk, batch: dict, weight: float, evaluating: bool = False) -> None:
        """Called before each microbatch's forward on each model chunk of this rank."""

    def take_metric_sums(self) -> Optional[torch.Tensor]:
        """This rank's sums for ``metric_keys`` (+ the token count) over the step just run, on the device."""
        return None

    def describe(self) -> Optional[str]:
        """One line for the run's start-up log, or None."""
        return None

    def close(self) -> None:
        """Free what the objective holds (the run is over)."""


def data_cost(cfg: LETConfig, convention: Convention) -> float:
    """C_data: training the whole student on the data (NLL), per token."""
    return student_flops_per_token(
        cfg.model, cfg.training.seq_length, convention, tensor_parallel=cfg.parallel.tensor_model_parallel_size
    )


def nll_cost_schedule(cfg: LETConfig, convention: Convention) -> CostSchedule:
    return CostSchedule.constant(TokenCost(data_cost(cfg, convention)))


def until(stop_step, during: TokenCost, after: TokenCost) -> CostSchedule:
    """``during`` for the steps before ``stop_step`` (None: the whole run), then ``after``."""
    if stop_step is None:
        return CostSchedule.constant(during)
    if stop_step <= 0:
        return CostSchedule.constant(after)
    return CostSchedule(((0, during), (stop_step, after)))
