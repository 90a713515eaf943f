"""Logit distillation on vocab-parallel logits: the KL divergence between the teacher's and the
student's next-token distributions at temperature τ, never gathering a full vocabulary row.

Under tensor parallelism each rank holds V/TP columns of the logits (megatron's output layer keeps
them split). As megatron's ``vocab_parallel_cross_entropy`` does, the softmax's max and sum are
all-reduced over the tensor-parallel group and the gradient is local, in closed form:

* forward KL to a target distribution q (the teacher's softmax at τ, or its top-k renormalised):
  ``KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)``, ``∂KL/∂z_v = (p_v − q_v) / τ``;
* reverse KL from the teacher's distribution t: ``KL(p ‖ t) = Σ_v p_v (log p_v − log t_v)``,
  ``∂KL/∂z_j = p_j ((log p_j − log t_j) − KL) / τ``;

with ``p = softmax(z / τ)`` the student's distribution. Columns past ``vocab_size`` (megatron pads
the vocabulary to a multiple of 128 × TP) are not tokens: they are left out of both distributions.

Top-k (the compute-matched paper keeps the teacher's k = 128 largest logits, as offline caches
do): the teacher's distribution is restricted to its k largest logits and **renormalised over
them** (a softmax of those k logits at τ); the student's log-probabilities stay those of its
full-vocabulary softmax. With k = V this is exactly full KD. The τ² factor and the mixing with
the NLL (Eq. 2, ``(1 − α)·NLL + α·τ²·KL``) belong to the objective, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def vocab_range(local_size: int, group=None) -> tuple[int, int]:
    """[start, end) of the vocabulary columns this tensor-parallel rank holds."""
    start = _group_rank(group) * local_size
    return start, start + local_size


def _masked(logits: torch.Tensor, vocab_size: int, group) -> torch.Tensor:
    """Logits in fp32 (or fp64 if given) with the padded columns (global index ≥ vocab_size) at −inf."""
    start, end = vocab_range(logits.shape[-1], group)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if end > vocab_size:
        columns = torch.arange(start, end, device=logits.device)
        logits = logits.masked_fill(columns >= vocab_size, float("-inf"))
    return logits


def _all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def gather_columns(tensor: torch.Tensor, group) -> torch.Tensor:
    """All vocabulary columns of a tensor split over ``group`` along its last dimension (each
    rank's slice, in rank order)."""
    parts = [torch.empty_like(tensor) for _ in range(_group_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def log_softmax(logits: torch.Tensor, tau: float, vocab_size: int, group=None) -> torch.Tensor:
    """log softmax(z / τ) over the whole (split) vocabulary, this rank's columns; no autograd."""
    with torch.no_grad():
        scaled = _masked(logits, vocab_size, group) / tau
        peak = _all_reduce(scaled.amax(dim=-1, keepdim=True), group, dist.ReduceOp.MAX)
        total = _all_reduce((scaled - peak).exp().sum(dim=-1, keepdim=True), group)
        return scaled - peak - total.log()


@dataclass
class Target:
    """A teacher distribution over this rank's vocabulary columns: probabilities and their logs
    (−inf where the probability is 0: padded columns, and outside the top-k)."""

    probs: torch.Tensor
    log_probs: torch.Tensor


def full_target(teacher_logits: torch.Tensor, tau: float, vocab_size: int, group=None) -> Target:
    log_probs = log_softmax(teacher_logits, tau, vocab_size, group)
    return Target(log_probs.exp(), log_probs)


def top_k_logits(
    teacher_logits: torch.Tensor, k: int, vocab_size: int, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k largest logits over the whole vocabulary (values, global indices), the same
    on every tensor-parallel rank: each rank's k largest, gathered, then the k largest of those."""
    with torch.no_grad():
        logits = _masked(teacher_logits, vocab_size, group)
        start, _ = vocab_range(logits.shape[-1], group)
        local_k = min(k, logits.shape[-1])
        values, indices = logits.topk(local_k, dim=-1)
        indices = indices + start
        if _group_size(group) > 1:
            values, indices = gather_columns(values, group), gather_columns(indices, group)
        k = min(k, vocab_size)
        values, chosen = values.topk(k, dim=-1)
        return values, indices.gather(-1, chosen)


def top_k_target(values: torch.Tensor, indices: torch.Tensor, tau: float, local_size: int, group=None) -> Target:
    """The distribution of the top-k logits (``values`` at global ``indices``, e.g. from
    :func:`top_k_logits` or a teacher cache) renormalised over them at τ, spread onto this rank's
    columns (zero elsewhere)."""
    with torch.no_grad():
        start, end = vocab_range(local_size, group)
        log_selected = torch.log_softmax(values.to(torch.promote_types(values.dtype, torch.float32)) / tau, dim=-1)
        mine = (indices >= start) & (indices < end)
        local = torch.where(mine, indices - start, torch.zeros_like(indices))
        log_probs = torch.full(
            (*values.shape[:-1], local_size), float("-inf"), dtype=log_selected.dtype, device=values.device
        )
        # A column not held here goes to column 0 as −inf; amax keeps a real value there if it has one.
        log_probs.scatter_reduce_(
            -1, local, log_selected.masked_fill(~mine, float("-inf")), reduce="amax", include_self=True
        )
        return Target(log_probs.exp(), log_probs)


class _ForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, target_probs, target_log_probs, tau, vocab_size, group):
        log_p = log_softmax(student_logits, tau, vocab_size, group)
        terms = torch.where(target_probs > 0, target_probs * (target_log_probs - log_p), 0.0)
        kl = _all_reduce(terms.sum(dim=-1), group)
        ctx.save_for_backward(log_p, target_probs)
        ctx.tau = tau
        ctx.dtype = student_logits.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        log_p, target_probs = ctx.saved_tensors
        grad = (log_p.exp() - target_probs) * (grad_kl.unsqueeze(-1) / ctx.tau)
        return grad.to(ctx.dtype), None, None, None, None, None


class _ReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_log_probs, tau, vocab_size, group):
        log_p = log_softmax(student_logits, tau, vocab_size, group)
        p = log_p.exp()
        gap = torch.where(p > 0, log_p - teacher_log_probs, 0.0)
        kl = _all_reduce((p * gap).sum(dim=-1), group)
        ctx.save_for_backward(p, gap, kl)
        ctx.tau = tau
        ctx.dtype = student_logits.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        p, gap, kl = ctx.saved_tensors
        grad = p * (gap - kl.unsqueeze(-1)) * (grad_kl.unsqueeze(-1) / ctx.tau)
        return grad.to(ctx.dtype), None, None, None, None


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    *,
    tau: float = 1.0,
    vocab_size: int,
    top_k: Optional[int] = None,
    reverse: bool = False,
    target: Optional[Target] = None,
    group=None,
) -> torch.Tensor:
    """Per-token KL between teacher and student next-token distributions at temperature τ,
    ``[...]`` for logits ``[..., V/TP]`` (this rank's vocabulary columns; ``group``: the tensor-
    parallel group, None for a whole vocabulary). Forward ``KL(p_T ‖ p_S)`` by default, over the
    teacher's ``top_k`` logits renormalised when given; ``reverse``: ``KL(p_S ‖ p_T)``, whole
    vocabulary only. ``target``: a ready teacher distribution (e.g. from a cache) instead of
    ``teacher_logits``. Differentiable in ``student_logits`` only (the teacher is frozen)."""
    if reverse:
        if top_k is not None or target is not None:
            raise ValueError("reverse KL needs the teacher's whole distribution (no top-k, no cached target)")
        assert teacher_logits is not None
        teacher_log_probs = log_softmax(teacher_logits, tau, vocab_size, group)
        return _ReverseKL.apply(student_logits, teacher_log_probs, tau, vocab_size, group)
    if target is None:
        assert teacher_logits is not None
        if top_k is None:
            target = full_target(teacher_logits, tau, vocab_size, group)
        else:
            values, indices = top_k_logits(teacher_logits, top_k, vocab_size, group)
            target = top_k_target(values, indices, tau, student_logits.shape[-1], group)
    return _ForwardKL.apply(student_logits, target.probs, target.log_probs, tau, vocab_size, group)


def hint_distance(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Hidden-layer distillation's normalised hint loss per token (the compute-matched paper's
    Eq. 4 and L_emb): the mean over the d_T coordinates of (t/‖t‖ − s/‖s‖)², each state divided by
    its own L2 norm over the hidden dimension (Appendix A.1: the residual streams of teacher and
    student differ in scale). ``student`` is the regressor's output. [..., d_T] → [...], fp32; it
    equals (2 − 2·cos)/d_T, kept in this form so its gradient is the plain MSE's."""
    s = student.float()
    t = teacher.float()
    s = s / s.norm(dim=-1, keepdim=True).clamp(min=eps)
    t = t / t.norm(dim=-1, keepdim=True).clamp(min=eps)
    return (t - s).pow(2).mean(dim=-1)
