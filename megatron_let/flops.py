"""FLOPs per token, in two conventions, and the piecewise-constant cost of a run.

``paper`` — the compute-matched paper's Appendix A.9, as written there:
  C_data = 6N + 6·d·V          N: the backbone (non-embedding) parameters, d·V: the logits
                                (de-embedding, left out of the usual 6ND). Backward = 2 × forward
                                for layers with parameters. Attention scores, norms' arithmetic,
                                softmax and the loss are not counted (the paper does not).
  teacher forward = 2·N_T (+ 2·d_T·V_T with its output layer); a regressor trains at 6·N_reg.
  The embedding lookup is a gather, not a matmul: free in both conventions.
``megatron`` — Megatron-LM's ``num_floating_point_operations`` (its training.py), the count
  throughput (TFLOP/s per GPU) is reported in, so it compares with Megatron-LM's logs and MFU
  tables: every GEMM 3× (forward, data and weight gradients), attention scores over the full
  (not causal-halved) s×s matrix, SwiGLU as 3/2 of a plain MLP, logits over the padded
  vocabulary, norms ignored; a frozen teacher's forward is a third of its training count.

What a method adds (the teacher, a regressor, a cheaper phase) is decided by the objectives
(:func:`megatron_let.objectives.cost_schedule`); this module knows shapes, not methods.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal, Optional

from megatron_let.config import ModelConfig
from megatron_let.model.gpt import count_parameters, padded_vocab_size

Convention = Literal["paper", "megatron"]
CONVENTIONS: tuple[str, ...] = ("paper", "megatron")


def student_flops_per_token(
    model: ModelConfig,
    seq_length: int,
    convention: Convention,
    *,
    layers: Optional[int] = None,
    logits: bool = True,
    tensor_parallel: int = 1,
) -> float:
    """Training (forward + backward) of the student's first ``layers`` layers (all by default)
    and, with ``logits``, its output layer: the paper's 6N + 6·d·V, or Megatron-LM's count."""
    if convention == "megatron":
        return megatron_lm_flops_per_token(model, seq_length, tensor_parallel, layers=layers, logits=logits)
    fraction = 1.0 if layers is None else layers / model.num_layers
    head = 6.0 * model.hidden_size * model.vocab_size if logits else 0.0
    return 6.0 * fraction * count_parameters(model)["non_embedding"] + head


def teacher_flops_per_token(
    teacher: ModelConfig,
    seq_length: int,
    convention: Convention,
    *,
    layers: Optional[int] = None,
    head: bool = False,
    tensor_parallel: int = 1,
) -> float:
    """The frozen teacher's forward up to layer ``layers`` (all: its final hidden state) and,
    with ``head``, its output layer (logit distillation): 2·N_T + 2·d_T·V_T in the paper's
    convention."""
    if convention == "megatron":
        return megatron_lm_flops_per_token(
            teacher, seq_length, tensor_parallel, forward_only=True, layers=layers, logits=head
        )
    fraction = 1.0 if layers is None else layers / teacher.num_layers
    logits = 2.0 * teacher.hidden_size * teacher.vocab_size if head else 0.0
    return 2.0 * fraction * count_parameters(teacher)["non_embedding"] + logits


def regressor_flops_per_token(parameters: int) -> float:
    """Training a regressor of ``parameters`` weights: 6·N_reg (both conventions: its GEMMs, 3 passes)."""
    return 6.0 * parameters


def megatron_lm_flops_per_token(
    model: ModelConfig,
    seq_length: int,
    tensor_parallel: int = 1,
    *,
    forward_only: bool = False,
    layers: int | None = None,
    logits: bool = True,
) -> float:
    """Megatron-LM's ``num_floating_point_operations`` per token (its training.py): 12·L·h²·[(1 +
    G/H + s/h)·(H·d_head/h) + (F/h)·(3/2 if SwiGLU)] + 6·h·V_padded — 3 GEMM passes (forward,
    data and weight gradients) × 2 GEMMs per block × 2 FLOPs per multiply-add. Forward only (a
    frozen teacher) is a third of it; ``layers`` counts only the first ones, ``logits`` the head."""
    h, heads = model.hidden_size, model.num_attention_heads
    groups = model.num_query_groups or heads
    query_ratio = heads * (model.kv_channels or h // heads) / h
    ffn = model.ffn_hidden_size or 4 * h
    gated = 1.5 if model.activation == "swiglu" else 1.0
    count = model.num_layers if layers is None else layers
    per_layer = (1 + groups / heads + seq_length / h) * query_ratio + ffn / h * gated
    vocab = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tensor_parallel)
    passes = 1 if forward_only else 3
    return passes * 4 * count * h * h * per_layer + (passes * 2 * h * vocab if logits else 0.0)


@dataclass(frozen=True)
class TokenCost:
    """FLOPs per token of one training step, by part."""

    student: float
    teacher: float = 0.0
    regressor: float = 0.0

    @property
    def total(self) -> float:
        return self.student + self.teacher + self.regressor


@dataclass(frozen=True)
class CostSchedule:
    """A run's per-token cost as a function of the step: ``phases`` are (first iteration, cost),
    the first at iteration 0; a phase holds from its first iteration (steps done before the
    step, Eq. 5's s) to the next one's. LET: (0, student + teacher), (S_stop, student)."""

    phases: tuple[tuple[int, TokenCost], ...]

    def __post_init__(self):
        starts = [start for start, _ in self.phases]
        if not starts or starts[0] != 0 or starts != sorted(starts):
            raise ValueError(f"phases must start at iteration 0, in order: {starts}")

    @classmethod
    def constant(cls, cost: TokenCost) -> CostSchedule:
        return cls(((0, cost),))

    def at(self, iteration: int) -> TokenCost:
        """The cost of the step run after ``iteration`` steps."""
        index = bisect.bisect_right([start for start, _ in self.phases], iteration) - 1
        return self.phases[index][1]

    def spent(self, iterations: int, tokens_per_step: int) -> float:
        """FLOPs of the first ``iterations`` steps."""
        total = 0.0
        for index, (start, cost) in enumerate(self.phases):
            end = self.phases[index + 1][0] if index + 1 < len(self.phases) else iterations
            total += max(0, min(end, iterations) - start) * tokens_per_step * cost.total
        return total

    def iterations_within(self, budget: float, tokens_per_step: int) -> int:
        """The most steps whose FLOPs stay within ``budget`` (the run stops before the step that
        would exceed it)."""
        iterations, left = 0, budget
        for index, (start, cost) in enumerate(self.phases):
            step = tokens_per_step * cost.total
            end = self.phases[index + 1][0] if index + 1 < len(self.phases) else None
            steps = int(left // step) if step > 0 else end
            if steps is None:
                raise ValueError("a phase without cost that never ends: no budget bounds it")
            if end is not None and steps >= end - start:
                iterations, left = end, left - (end - start) * step
                continue
            return start + steps
        return iterations


class FlopsCounter:
    """A run's FLOPs: the total spent so far (``counted``, in the run's convention; restored on
    resume) and, per step, the count its throughput is reported in (``throughput``, Megatron-LM's)."""

    def __init__(self, counted: CostSchedule, throughput: CostSchedule, tokens_per_step: int, iteration: int = 0):
        self.counted, self.throughput = counted, throughput
        self.tokens_per_step = tokens_per_step
        self.total = counted.spent(iteration, tokens_per_step)

    def step(self, iteration: int) -> float:
        """Count the step run after ``iteration`` steps; returns its throughput FLOPs."""
        self.total += self.tokens_per_step * self.counted.at(iteration).total
        return self.tokens_per_step * self.throughput.at(iteration).total
