"""megatron_let.distillation against plain PyTorch: KL values and their gradients (autograd on an
fp64 reference written with torch's own log_softmax / kl_div), top-k, padded vocabulary columns,
and the vocab-parallel form (TP 2, gloo) equal to the whole-vocabulary one."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_let.distillation import kl_divergence, top_k_logits, top_k_target

PADDED, VOCAB = 64, 50  # megatron pads the vocabulary: columns 50..63 are not tokens


def logits_pair(seed=0, shape=(5, 3)):
    generator = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(*shape, PADDED, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(*shape, PADDED, generator=generator, dtype=torch.float64)
    return student, teacher


def reference(student, teacher, tau, top_k=None, reverse=False):
    """Per-token KL the textbook way, on the real vocabulary only."""
    log_p = torch.log_softmax(student[..., :VOCAB] / tau, dim=-1)
    log_t = torch.log_softmax(teacher[..., :VOCAB] / tau, dim=-1)
    if reverse:
        return torch.nn.functional.kl_div(log_t, log_p, log_target=True, reduction="none").sum(-1)
    if top_k is None:
        return torch.nn.functional.kl_div(log_p, log_t, log_target=True, reduction="none").sum(-1)
    values, indices = teacher[..., :VOCAB].topk(top_k, dim=-1)
    log_q = torch.log_softmax(values / tau, dim=-1)  # renormalised over the top k
    return (log_q.exp() * (log_q - log_p.gather(-1, indices))).sum(-1)


def value_and_grad(fn, student):
    student = student.clone().requires_grad_(True)
    weights = torch.linspace(0.5, 1.5, student[..., 0].numel(), dtype=student.dtype).reshape(student.shape[:-1])
    kl = fn(student)
    (kl * weights).sum().backward()  # a non-uniform upstream gradient
    return kl.detach(), student.grad


CASES = [
    dict(tau=1.0),
    dict(tau=2.0),
    dict(tau=0.5),
    dict(tau=1.0, top_k=8),
    dict(tau=2.0, top_k=1),
    dict(tau=1.5, reverse=True),
    dict(tau=0.7, reverse=True),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_kl_and_gradient_match_autograd_on_the_reference(case):
    student, teacher = logits_pair()
    got, got_grad = value_and_grad(lambda s: kl_divergence(s, teacher, vocab_size=VOCAB, **case), student)
    want, want_grad = value_and_grad(lambda s: reference(s, teacher, **case), student)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    assert torch.all(got_grad[..., VOCAB:] == 0)  # padded columns learn nothing
    assert torch.all(got >= -1e-12)


def test_top_k_of_the_whole_vocabulary_is_full_kd():
    student, teacher = logits_pair(1)
    full, full_grad = value_and_grad(lambda s: kl_divergence(s, teacher, tau=1.3, vocab_size=VOCAB), student)
    top, top_grad = value_and_grad(lambda s: kl_divergence(s, teacher, tau=1.3, vocab_size=VOCAB, top_k=VOCAB), student)
    torch.testing.assert_close(top, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(top_grad, full_grad, rtol=1e-9, atol=1e-12)


def test_identical_distributions_have_zero_kl_and_gradient():
    student, _ = logits_pair(2)
    for reverse in (False, True):
        kl, grad = value_and_grad(
            lambda s: kl_divergence(s, student, tau=2.0, vocab_size=VOCAB, reverse=reverse),  # noqa: B023
            student,
        )
        assert kl.abs().max() < 1e-12 and grad.abs().max() < 1e-12


def test_reverse_refuses_top_k():
    student, teacher = logits_pair()
    with pytest.raises(ValueError, match="reverse KL"):
        kl_divergence(student, teacher, vocab_size=VOCAB, top_k=4, reverse=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensor_parallel_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        student, teacher = logits_pair(3)
        width = PADDED // world
        columns = slice(rank * width, (rank + 1) * width)
        out = {}
        for name, case in [
            ("full", dict(tau=1.7)),
            ("top_k", dict(tau=0.9, top_k=12)),
            ("reverse", dict(tau=1.2, reverse=True)),
        ]:
            kl, grad = value_and_grad(
                lambda s: kl_divergence(s, teacher[..., columns], vocab_size=VOCAB, group=dist.group.WORLD, **case),  # noqa: B023
                student[..., columns],
            )
            out[name] = (kl, grad)
        values, indices = top_k_logits(teacher[..., columns], 12, VOCAB, dist.group.WORLD)
        out["top_k_indices"] = indices
        out["cached_target"] = top_k_target(values, indices, 0.9, width, dist.group.WORLD).probs
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_tp2_equals_the_whole_vocabulary():
    world = 2
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_tensor_parallel_worker, args=(world, _free_port(), results), nprocs=world)
    student, teacher = logits_pair(3)
    cases = {"full": dict(tau=1.7), "top_k": dict(tau=0.9, top_k=12), "reverse": dict(tau=1.2, reverse=True)}
    for name, case in cases.items():
        want, want_grad = value_and_grad(lambda s: reference(s, teacher, **case), student)  # noqa: B023
        for rank in range(world):
            torch.testing.assert_close(results[rank][name][0], want, rtol=1e-10, atol=1e-12)  # replicated
        grad = torch.cat([results[rank][name][1] for rank in range(world)], dim=-1)
        torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)
    _, indices = teacher[..., :VOCAB].topk(12, dim=-1)
    for rank in range(world):
        assert torch.equal(results[rank]["top_k_indices"].sort(-1).values, indices.sort(-1).values)
    probs = torch.cat([results[rank]["cached_target"] for rank in range(world)], dim=-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1], dtype=probs.dtype))
