"""One process on one GPU: read gradient dumps written by gpu_one_step.py back at TP=PP=1, and
(--direct) compute the reference of read_grads.py on the GPU in BF16 — the same step's gradients by
plain autograd of Σ_m (LM_m + λ·L_align,m) / M, without the hook, the aux-loss scaler or megatron's
schedule — and the same without the alignment term (how much the alignment moves each gradient).

Usage: gpu_grads.py --config BASE.yaml --set ... --out grads.pt [--direct] DUMP_DIR ...
Everything in grads.pt is on the CPU in fp32: {dump_dir: {name: grad}, "direct": {...},
"direct_no_alignment": {...}, "direct_losses": {"lm_loss", "alignment_loss"}}.

--direct needs ``training.gradient_accumulation_fusion=false``: with it, TE's GEMMs (and megatron's
output layer) write weight gradients into main_grad and hand autograd a dummy instead.
"""

import sys

import torch

import harness_args  # tests/harness/, the script's own directory


def direct_gradients(trainer, gpt, batches, weight: float):
    """Plain autograd over ``batches`` (the step's microbatches) of Σ_m (LM_m + weight·L_align,m) / M."""
    from megatron_let.alignment import cosine_similarity

    captured = {}
    layer = gpt.decoder.layers[trainer.objective.target_layer - 1]
    handle = layer.register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("h", output[0] if isinstance(output, tuple) else output)
    )
    named = list(gpt.named_parameters())
    total = 0.0
    sums = torch.zeros(4, dtype=torch.float64, device=trainer.device)  # Σ LM, LM tokens, Σ -cos, tokens
    for batch in batches:
        per_token = gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        mask = batch["loss_mask"].float()
        lm_sum = (per_token.float() * mask).sum()
        loss = lm_sum / mask.sum()
        sums[0] += lm_sum.detach().double()
        sums[1] += mask.sum().double()
        if getattr(trainer.objective, "teacher", None) is not None:
            teacher = trainer.objective.teacher.hidden_states(batch["tokens"], batch["position_ids"], None)
            mask_sb = mask.t()
            align_sum = (-cosine_similarity(captured["h"], teacher) * mask_sb).sum()
            sums[2] += align_sum.detach().double()
            sums[3] += mask_sb.sum().double()
            if weight > 0:
                loss = loss + weight * align_sum / mask_sb.sum()
        total = total + loss / len(batches)
    grads = torch.autograd.grad(total, [p for _, p in named])
    handle.remove()
    sums = sums.cpu()
    losses = {"lm_loss": float(sums[0] / sums[1]), "alignment_loss": float(sums[2] / sums[3]) if sums[3] > 0 else None}
    return {name: g.detach().float().cpu().clone() for (name, _), g in zip(named, grads)}, losses


def main():
    parser = harness_args.parser()
    parser.add_argument("--direct", action="store_true")
    parser.add_argument("dumps", nargs="*")
    args = parser.parse_args()

    from megatron.core import dist_checkpointing

    from megatron_let.alignment import alignment_weight
    from megatron_let.model.gpt import unwrap
    from megatron_let.platform import distributed as parallel
    from megatron_let.run_config import load_run_config as load_config
    from megatron_let.training.trainer import Trainer

    cfg = load_config(args.config, args.set)
    trainer = Trainer(cfg)
    gpt = unwrap(trainer.model[0])
    result = {}

    if args.direct:
        if trainer.config.gradient_accumulation_fusion:
            raise SystemExit("gpu_grads.py --direct: set training.gradient_accumulation_fusion=false")
        weight = (
            alignment_weight(0, cfg.alignment.lambda0, cfg.alignment.stop_step)
            if getattr(trainer.objective, "teacher", None)
            else 0.0
        )
        if getattr(trainer.objective, "hook", None) is not None:
            trainer.objective.hook.remove()
        batches = [next(trainer.train_data) for _ in range(trainer.num_microbatches)]
        result["direct"], result["direct_losses"] = direct_gradients(trainer, gpt, batches, weight)
        result["direct_no_alignment"], _ = direct_gradients(trainer, gpt, batches, 0.0)

    for dump in args.dumps:
        loaded = dist_checkpointing.load({"model": gpt.sharded_state_dict()}, dump)
        gpt.load_state_dict(loaded["model"])
        result[dump] = {name: p.detach().float().cpu().clone() for name, p in gpt.named_parameters()}
    torch.save(result, args.out)
    trainer.close()
    parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
