"""megatron's optimizer (Adam, mixed precision, optionally distributed) and its lr/wd scheduler."""

from __future__ import annotations

from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_let.config import LETConfig
from megatron_let.model.gpt import DTYPES


def build_optimizer(cfg: LETConfig, model: list, *, precision: str, on_cpu: bool):
    """(optimizer, scheduler) over the model chunks; the loss scale is wired into the model config."""
    opt, train = cfg.optimizer, cfg.training
    config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr if opt.min_lr is not None else 0.1 * opt.lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype=DTYPES[precision],
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model, use_gloo_process_groups=on_cpu)
    model[0].config.grad_scale_func = optimizer.scale_loss
    decay_steps = max(1, train.train_iters)
    warmup = min(int(round(opt.lr_warmup_fraction * train.train_iters)), decay_steps - 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay_steps,
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def align_scheduler(scheduler: OptimizerParamScheduler, iteration: int) -> None:
    """The scheduler always stands at the iteration about to run (1-based): iteration i trains
    at schedule(i), so the first warm-up step is not spent at lr 0 (megatron's scheduler
    starts at schedule(0) = init_lr), and the lr logged for an iteration is the one it used."""
    scheduler.step(increment=iteration + 1 - scheduler.num_steps)
