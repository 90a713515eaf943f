"""LET's alignment term, Eq. 4–7 of the paper: pure tensor functions, any device, no parallel state."""

from __future__ import annotations

from typing import Callable, Optional

import torch


def interpolate_hidden(h: torch.Tensor, out_dim: int) -> torch.Tensor:
    """Linearly interpolate ``h`` along its last dimension to ``out_dim`` entries (Eq. 6).

    Coordinate ``j`` of the output reads source position ``u_j = j (d_in - 1) / (out_dim - 1)``,
    so the first and last entries map onto the first and last entries (endpoints aligned). No
    learned weights: this is a fixed linear map, and an identity when the widths match.
    """
    in_dim = h.shape[-1]
    if in_dim == out_dim:
        return h
    if out_dim < 1 or in_dim < 1:
        raise ValueError(f"cannot interpolate a width-{in_dim} state to width {out_dim}")
    if out_dim == 1 or in_dim == 1:
        # u_j is undefined for out_dim == 1; a single source entry is simply broadcast.
        return h[..., :1].expand(*h.shape[:-1], out_dim) if in_dim == 1 else h[..., :1]
    # Positions computed in float64 so the floor is exact at the integer grid points.
    u = torch.arange(out_dim, dtype=torch.float64, device=h.device) * ((in_dim - 1) / (out_dim - 1))
    lower = u.floor().long().clamp_(max=in_dim - 1)
    upper = (lower + 1).clamp_(max=in_dim - 1)
    beta = (u - lower.to(torch.float64)).to(h.dtype)
    return torch.lerp(h[..., lower], h[..., upper], beta)


def _per_token_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def cosine_similarity(h_target: torch.Tensor, h_teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-token cosine similarity (Eq. 4), after interpolating the target to the teacher's width.

    Computed in fp32 whatever the inputs' dtype: the norms of BF16 activations are too coarse.
    """
    h_target = interpolate_hidden(h_target.float(), h_teacher.shape[-1])
    return torch.nn.functional.cosine_similarity(h_target, h_teacher.float(), dim=-1, eps=eps)


def cosine_alignment_loss(
    h_target: torch.Tensor, h_teacher: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """L_proj of Eq. 4/7: −cos(h̃_M, h_T) per token, averaged over the unmasked tokens.

    ``h_target`` [..., d_M] and ``h_teacher`` [..., d_T] share their leading (token) dimensions;
    ``mask`` (same leading shape, 1 = keep) drops padding. Eq. 7 sums over positions; we take the
    per-token *mean*, consistent with megatron's per-token LM loss, so that λ0 = 0.1 means the same
    thing whatever the sequence length and batch size.
    """
    return -_per_token_mean(cosine_similarity(h_target, h_teacher), mask)


def logsum_distance(h_target: torch.Tensor, h_teacher: torch.Tensor, exponent: float = 4.0) -> torch.Tensor:
    """Appendix H's alternative: the LogSum distance (Miles & Mikolajczyk, 2024) per token,
    ``log Σ_j |h̃_M,j − h_T,j|^α`` between the L2-normalised states (fp32). Large per-coordinate
    discrepancies dominate the sum, which is what the paper credits it for."""
    h_target = interpolate_hidden(h_target.float(), h_teacher.shape[-1])
    a = torch.nn.functional.normalize(h_target, dim=-1)
    b = torch.nn.functional.normalize(h_teacher.float(), dim=-1)
    return torch.log((a - b).abs().pow(exponent).sum(dim=-1).clamp(min=1e-30))


def logsum_alignment_loss(
    h_target: torch.Tensor,
    h_teacher: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    exponent: float = 4.0,
) -> torch.Tensor:
    """:func:`logsum_distance` averaged over the unmasked tokens."""
    return _per_token_mean(logsum_distance(h_target, h_teacher, exponent), mask)


def cca_alignment_loss(
    h_target: torch.Tensor,
    h_teacher: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    ridge: float = 1e-3,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Table 5's LET-CCA: minus the mean canonical correlation between the interpolated target
    states and the teacher states over the tokens of a microbatch (Deep CCA's total correlation,
    Andrew et al. 2013, divided by the width), in [−1, 0].

    Each token is a sample of two d_T-dimensional variables (the target state interpolated to d_T
    by Eq. 6, and the teacher's). With C the mask-weighted covariances, each regularised by
    ``ridge`` × its mean variance on the diagonal (a microbatch may hold fewer tokens than the
    width, and a state may have constant coordinates), the canonical correlations are the singular
    values of L_x⁻¹ C_xy L_y⁻ᵀ (C_xx = L_x L_xᵀ, Cholesky; any whitening gives the same values), and
    ``torch.linalg.svdvals`` differentiates them stably. Unlike the per-token cosine, the loss is
    invariant to any invertible linear map of either side: it asks for linearly *predictable*
    teacher features, not equal ones.

    ``reduce``: sums the sufficient statistics over the ranks that hold the other tokens
    (sequence parallelism: megatron's reduce_from_tensor_model_parallel_region — all-reduce
    forward, identity backward, as the loss is then the same on every rank)."""
    dtype = torch.promote_types(h_target.dtype, torch.float32)  # fp32 at least (fp64 stays, for tests)
    x = interpolate_hidden(h_target.to(dtype), h_teacher.shape[-1]).flatten(0, -2)
    y = h_teacher.to(dtype).flatten(0, -2)
    weights = torch.ones(x.shape[0], dtype=dtype, device=x.device) if mask is None else mask.to(dtype).flatten()
    d = x.shape[-1]
    wx, wy = x * weights[:, None], y * weights[:, None]
    stats = torch.cat(
        [
            weights.sum().reshape(1),
            wx.sum(0),
            wy.sum(0),
            (x.t() @ wx).flatten(),
            (y.t() @ wy).flatten(),
            (x.t() @ wy).flatten(),
        ]
    )
    if reduce is not None:
        stats = reduce(stats)
    n = stats[0].clamp(min=1)
    mean_x, mean_y = stats[1 : 1 + d] / n, stats[1 + d : 1 + 2 * d] / n
    offset = 1 + 2 * d
    cxx = stats[offset : offset + d * d].view(d, d) / n - torch.outer(mean_x, mean_x)
    cyy = stats[offset + d * d : offset + 2 * d * d].view(d, d) / n - torch.outer(mean_y, mean_y)
    cxy = stats[offset + 2 * d * d :].view(d, d) / n - torch.outer(mean_x, mean_y)
    eye = torch.eye(d, dtype=dtype, device=x.device)
    cxx = cxx + ridge * cxx.diagonal().mean().clamp(min=1e-12) * eye
    cyy = cyy + ridge * cyy.diagonal().mean().clamp(min=1e-12) * eye
    lx, ly = torch.linalg.cholesky(cxx), torch.linalg.cholesky(cyy)
    whitened = torch.linalg.solve_triangular(lx, cxy, upper=False)  # L_x⁻¹ C_xy
    whitened = torch.linalg.solve_triangular(ly, whitened.t(), upper=False).t()  # … L_y⁻ᵀ
    return -torch.linalg.svdvals(whitened).mean()


def alignment_weight(step: int, lambda0: float, s_stop: int) -> float:
    """λ at 0-based training step ``step`` (Eq. 5): λ0 · max(0, (S_stop − s) / S_stop)."""
    if s_stop <= 0:
        raise ValueError(f"s_stop must be positive, got {s_stop}")
    return lambda0 * max(0.0, (s_stop - step) / s_stop)
