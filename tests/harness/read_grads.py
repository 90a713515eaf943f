"""Single process: read gradient dumps written by one_step.py back at TP=PP=1, and compute the
direct reference — the same step's gradients by plain autograd of Σ_m (LM_m + λ·L_align,m) / M
(L_align: the config's cosine or CCA loss),
without the hook, the aux-loss scaler or megatron's schedule.

Usage: read_grads.py --config BASE.yaml --set ... --out grads.pt [--direct | --direct-kd] [--initial] DUMP_DIR ...
"""

import sys

import torch

import harness_args  # tests/harness/, the script's own directory


def main():
    parser = harness_args.parser()
    parser.add_argument("--direct", action="store_true")
    parser.add_argument("--direct-kd", action="store_true", help="the reference for a logit-distillation step")
    parser.add_argument("--initial", action="store_true", help="also the model's initial weights, as built")
    parser.add_argument("dumps", nargs="*")
    args = parser.parse_args()

    from megatron_let import checkpoint
    from megatron_let.alignment import alignment_weight, cca_alignment_loss, cosine_alignment_loss
    from megatron_let.model.gpt import unwrap
    from megatron_let.platform import distributed as parallel
    from megatron_let.run_config import load_run_config as load_config
    from megatron_let.training.trainer import Trainer

    cfg = load_config(args.config, args.set)
    trainer = Trainer(cfg)
    gpt = unwrap(trainer.model[0])
    result = {}

    if args.direct:
        weight = (
            alignment_weight(0, cfg.alignment.lambda0, cfg.alignment.stop_step)
            if getattr(trainer.objective, "teacher", None)
            else 0.0
        )
        if getattr(trainer.objective, "hook", None) is not None:
            trainer.objective.hook.remove()
        captured = {}
        layer = gpt.decoder.layers[trainer.objective.target_layer - 1]
        layer.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o[0]))
        params = [p for p in gpt.parameters()]
        total = 0.0
        m = trainer.num_microbatches
        for _ in range(m):
            batch = next(trainer.train_data)
            per_token = gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            mask = batch["loss_mask"].float()
            loss = (per_token * mask).sum() / mask.sum()
            if weight > 0:
                teacher = trainer.objective.teacher.hidden_states(batch["tokens"], batch["position_ids"], None)
                if cfg.alignment.loss == "cca":
                    loss = loss + weight * cca_alignment_loss(captured["h"], teacher, mask.t(), cfg.alignment.cca_ridge)
                else:
                    loss = loss + weight * cosine_alignment_loss(captured["h"], teacher, mask.t())
            total = total + loss / m
        grads = torch.autograd.grad(total, params)
        result["direct"] = {n: g for (n, _), g in zip(gpt.named_parameters(), grads)}

    if args.direct_kd:
        result["direct"] = direct_kd_gradients(cfg, trainer, gpt)

    if args.initial:
        result["initial"] = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    for dump in args.dumps:
        checkpoint.load_checkpoint(dump, trainer.model, None, None)
        result[dump] = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    torch.save(result, args.out)
    trainer.close()
    parallel.shutdown()


def direct_kd_gradients(cfg, trainer, gpt) -> dict:
    """Σ_m mean_t[(1 − α)·NLL + α·τ²·KL(q_T ‖ p_S)] / M by plain autograd: torch's own
    cross-entropy (over the padded columns, as megatron's), log_softmax and top-k, full logits.
    hldc adds γ·mean_t ‖t/‖t‖ − W_R·h/‖W_R·h‖‖² / d_T (torch's normalize and mse_loss), h and t the
    outputs of the student's and the teacher's hint layers, read by forward hooks."""
    import torch.nn.functional as F

    d, vocab = cfg.distillation, cfg.model.vocab_size
    teacher = trainer.objective.teacher
    params = list(gpt.parameters())
    hint = cfg.objective in ("hldc", "hldf")
    hint_only = cfg.objective == "hldf"  # its phase 1: the hint loss alone (weight 1), no NLL, no KD
    captured = {}
    if hint:
        trainer.objective.hook.remove()  # the term is written out below instead
        student_layer, teacher_layer = trainer.objective.student_layer, trainer.objective.teacher_layer
        gpt.decoder.layers[student_layer - 1].register_forward_hook(lambda m, i, o: captured.__setitem__("h", o[0]))
        teacher.model.decoder.layers[teacher_layer - 1].register_forward_hook(
            lambda m, i, o: captured.__setitem__("t", o[0])
        )
    total = 0.0
    m = trainer.num_microbatches
    for _ in range(m):
        batch = next(trainer.train_data)
        logits = gpt(batch["tokens"], batch["position_ids"], None)  # [b, s, V_padded]
        nll = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none").view(logits.shape[:2])
        teacher_logits = teacher.logits(batch["tokens"], batch["position_ids"], None).transpose(0, 1)[..., :vocab]
        log_p = torch.log_softmax(logits[..., :vocab] / d.temperature, dim=-1)
        if d.reverse:
            log_t = torch.log_softmax(teacher_logits / d.temperature, dim=-1)
            kl = (log_p.exp() * (log_p - log_t)).sum(-1)
        elif d.top_k is None:
            log_t = torch.log_softmax(teacher_logits / d.temperature, dim=-1)
            kl = (log_t.exp() * (log_t - log_p)).sum(-1)
        else:
            values, indices = teacher_logits.topk(d.top_k, dim=-1)
            log_q = torch.log_softmax(values / d.temperature, dim=-1)
            kl = (log_q.exp() * (log_q - log_p.gather(-1, indices))).sum(-1)
        per_token = (1 - d.alpha) * nll + d.alpha * d.temperature**2 * kl
        if hint:
            regressed = F.normalize(gpt.hint_regressor(captured["h"]), dim=-1)
            target = F.normalize(captured["t"], dim=-1)
            hint_loss = F.mse_loss(regressed, target, reduction="none").mean(-1).t()
            per_token = hint_loss if hint_only else per_token + cfg.hld.gamma * hint_loss
        mask = batch["loss_mask"].float()
        total = total + (per_token * mask).sum() / mask.sum() / m
    # Parameters the loss does not reach (HLDF's later layers) have gradient 0.
    grads = torch.autograd.grad(total, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return {n: g for (n, _), g in zip(gpt.named_parameters(), grads)}


if __name__ == "__main__":
    sys.exit(main())
