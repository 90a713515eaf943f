"""Eq. 4–7 against independent numpy computations (no megatron, no parallel state)."""

import math

import numpy as np
import pytest
import torch

from megatron_let.alignment import (
    alignment_weight,
    cca_alignment_loss,
    cosine_alignment_loss,
    cosine_similarity,
    interpolate_hidden,
    logsum_alignment_loss,
)


def numpy_interpolate(h: np.ndarray, out_dim: int) -> np.ndarray:
    """Eq. 6 via numpy's own piecewise-linear interpolation at u_j = j (d_M − 1)/(d_T − 1)."""
    d_in = h.shape[-1]
    u = np.arange(out_dim) * (d_in - 1) / (out_dim - 1)
    flat = h.reshape(-1, d_in)
    return np.stack([np.interp(u, np.arange(d_in), row) for row in flat]).reshape(*h.shape[:-1], out_dim)


@pytest.mark.parametrize("d_in,d_out", [(64, 48), (48, 64), (2048, 576), (576, 2048), (7, 3), (3, 7)])
def test_interpolation_matches_numpy(d_in, d_out):
    h = np.random.default_rng(d_in * 7 + d_out).standard_normal((3, 5, d_in))
    ours = interpolate_hidden(torch.from_numpy(h), d_out).numpy()
    np.testing.assert_allclose(ours, numpy_interpolate(h, d_out), rtol=1e-12, atol=1e-12)


def test_interpolation_endpoints_and_identity():
    h = torch.randn(4, 10, 100, dtype=torch.float64)
    out = interpolate_hidden(h, 37)
    assert out.shape == (4, 10, 37)
    torch.testing.assert_close(out[..., 0], h[..., 0], rtol=0, atol=0)
    torch.testing.assert_close(out[..., -1], h[..., -1], rtol=0, atol=1e-12)
    assert interpolate_hidden(h, 100) is h


def test_interpolation_is_differentiable_and_weight_free():
    h = torch.randn(2, 8, requires_grad=True)
    interpolate_hidden(h, 5).sum().backward()
    # Each output coordinate spreads weight 1 over its two sources: total gradient = out_dim.
    assert math.isclose(float(h.grad.sum()), 5 * 2, rel_tol=1e-6)


def numpy_cosine_loss(h_target, h_teacher, mask=None):
    h = numpy_interpolate(h_target, h_teacher.shape[-1]) if h_target.shape[-1] != h_teacher.shape[-1] else h_target
    cos = (h * h_teacher).sum(-1) / (np.linalg.norm(h, axis=-1) * np.linalg.norm(h_teacher, axis=-1))
    if mask is None:
        return -cos.mean(), cos
    return -(cos * mask).sum() / mask.sum(), cos


def test_cosine_loss_matches_numpy_with_width_mismatch_and_mask():
    rng = np.random.default_rng(0)
    h_target = rng.standard_normal((16, 3, 64))
    h_teacher = rng.standard_normal((16, 3, 48))
    mask = (rng.random((16, 3)) > 0.3).astype(np.float64)
    expected, cos = numpy_cosine_loss(h_target, h_teacher, mask)
    ours = cosine_alignment_loss(torch.from_numpy(h_target), torch.from_numpy(h_teacher), torch.from_numpy(mask))
    assert math.isclose(float(ours), expected, rel_tol=1e-6)
    per_token = cosine_similarity(torch.from_numpy(h_target), torch.from_numpy(h_teacher)).numpy()
    np.testing.assert_allclose(per_token, cos, rtol=1e-5, atol=1e-6)


def test_cosine_loss_bounds():
    h = torch.randn(10, 2, 32)
    assert math.isclose(float(cosine_alignment_loss(h, h)), -1.0, abs_tol=1e-6)
    assert math.isclose(float(cosine_alignment_loss(h, -h)), 1.0, abs_tol=1e-6)
    # Scale invariance: Eq. 4 normalises both states.
    assert math.isclose(float(cosine_alignment_loss(3.0 * h, h)), -1.0, abs_tol=1e-6)


def test_cosine_loss_in_bf16_is_computed_in_fp32():
    rng = np.random.default_rng(1)
    h_t, h_s = rng.standard_normal((8, 2, 96)), rng.standard_normal((8, 2, 64))
    expected, _ = numpy_cosine_loss(h_t.astype(np.float32).astype(np.float64), h_s)
    ours = cosine_alignment_loss(torch.tensor(h_t).bfloat16(), torch.tensor(h_s).bfloat16())
    assert ours.dtype == torch.float32
    assert abs(float(ours) - expected) < 2e-2


def test_logsum_loss_matches_numpy():
    rng = np.random.default_rng(2)
    h_target, h_teacher = rng.standard_normal((6, 2, 40)), rng.standard_normal((6, 2, 30))
    h = numpy_interpolate(h_target, 30)
    a = h / np.linalg.norm(h, axis=-1, keepdims=True)
    b = h_teacher / np.linalg.norm(h_teacher, axis=-1, keepdims=True)
    expected = np.log((np.abs(a - b) ** 4).sum(-1)).mean()
    ours = logsum_alignment_loss(torch.from_numpy(h_target), torch.from_numpy(h_teacher), exponent=4.0)
    assert math.isclose(float(ours), expected, rel_tol=1e-6)


@pytest.mark.parametrize("step,expected", [(0, 0.1), (750, 0.05), (1500, 0.0), (1501, 0.0), (10_000, 0.0)])
def test_alignment_weight_eq5(step, expected):
    assert math.isclose(alignment_weight(step, 0.1, 1500), expected, abs_tol=1e-15)


def test_alignment_weight_is_linear():
    weights = [alignment_weight(s, 0.3, 10) for s in range(11)]
    diffs = np.diff(weights)
    np.testing.assert_allclose(diffs, -0.03, rtol=1e-9)
    with pytest.raises(ValueError):
        alignment_weight(0, 0.1, 0)


def canonical_correlations_qr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Björck & Golub's route (no covariance, no whitening): the singular values of Q_xᵀ Q_y for
    the QR factors of the centred samples."""
    qx, _ = np.linalg.qr(x - x.mean(0))
    qy, _ = np.linalg.qr(y - y.mean(0))
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


def test_cca_loss_is_the_mean_canonical_correlation():
    rng = np.random.default_rng(0)
    tokens, width = 400, 6
    teacher = rng.normal(size=(tokens, width))
    target = teacher @ rng.normal(size=(width, width)) + 0.8 * rng.normal(size=(tokens, width))
    want = -canonical_correlations_qr(target, teacher).mean()
    got = cca_alignment_loss(torch.tensor(target), torch.tensor(teacher), ridge=0.0)
    assert float(got) == pytest.approx(want, rel=1e-9)
    # Masked tokens are left out: the same as dropping them.
    mask = rng.random(tokens) > 0.3
    got = cca_alignment_loss(torch.tensor(target), torch.tensor(teacher), torch.tensor(mask), ridge=0.0)
    assert float(got) == pytest.approx(-canonical_correlations_qr(target[mask], teacher[mask]).mean(), rel=1e-9)
    # Invariant to invertible linear maps of either side (what distinguishes it from the cosine).
    mixed = cca_alignment_loss(torch.tensor(target @ rng.normal(size=(width, width))), torch.tensor(teacher), ridge=0.0)
    assert float(mixed) == pytest.approx(want, rel=1e-7)


def test_cca_loss_interpolates_widths_and_has_a_sound_gradient():
    torch.manual_seed(0)
    target = torch.randn(2, 40, 9, dtype=torch.float64, requires_grad=True)  # [b, s, d_M], d_M ≠ d_T
    teacher = torch.randn(2, 40, 5, dtype=torch.float64)
    mask = (torch.rand(2, 40) > 0.2).double()
    assert torch.autograd.gradcheck(lambda h: cca_alignment_loss(h, teacher, mask, ridge=1e-2), (target,))
    loss = cca_alignment_loss(target, teacher, mask)
    assert -1 <= float(loss.detach()) <= 0
    # Perfectly linearly related states: every canonical correlation is 1.
    same = cca_alignment_loss(teacher @ torch.randn(5, 5, dtype=torch.float64), teacher, ridge=0.0)
    assert float(same) == pytest.approx(-1.0, abs=1e-9)


def test_cca_sums_its_statistics_over_sequence_shards():
    """Under sequence parallelism each rank holds part of the tokens: summing the statistics
    (``reduce``) gives the loss of the whole microbatch. Two shards simulated in one process."""
    torch.manual_seed(1)
    target, teacher = torch.randn(64, 3, 10, dtype=torch.float64), torch.randn(64, 3, 8, dtype=torch.float64)
    whole = cca_alignment_loss(target, teacher)
    other = {}

    def keep(stats):  # shard 0's view: its own statistics plus shard 1's
        return stats + other["stats"]

    def capture(stats):
        other["stats"] = stats.detach()
        return stats

    cca_alignment_loss(target[32:], teacher[32:], reduce=capture)
    assert float(cca_alignment_loss(target[:32], teacher[:32], reduce=keep)) == pytest.approx(float(whole), rel=1e-12)
