"""megatron's optimizer (Adam, mixed precision, optionally distributed) and its lr/wd scheduler."""

from __future__ import annotations

from functools import partial
from typing import Optional

from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import ParamKey, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_let.config import LETConfig
from megatron_let.model.gpt import DTYPES
from megatron_let.objectives.base import PhasedSchedule

FROZEN_GROUP = "frozen_in_phase1"  # the key marking the parameter groups a PhasedSchedule freezes


class PhasedScheduler(OptimizerParamScheduler):
    """megatron's scheduler over a :class:`PhasedSchedule`: in phase 1 (iterations ≤ boundary) a
    warm-up then a constant lr, the frozen groups at lr 0 (so Adam moves them neither by gradient
    nor by weight decay); after it, megatron's own schedule counted from the boundary (its
    warm-up is the re-warm-up)."""

    def __init__(self, optimizer, phases: PhasedSchedule, **schedule):
        self.phases = phases
        super().__init__(optimizer, **schedule)

    def get_lr(self, param_group: dict) -> float:
        step: int = self.num_steps  # type: ignore[has-type]
        boundary = self.phases.boundary
        if step <= boundary:
            if param_group.get(FROZEN_GROUP):
                return 0.0
            peak: float = param_group.get("max_lr") or self.max_lr
            warmup = min(self.phases.phase1_warmup, boundary)
            return peak * step / warmup if warmup and step <= warmup else peak
        self.num_steps = step - boundary
        try:
            return super().get_lr(param_group)
        finally:
            self.num_steps = step


def build_optimizer(
    cfg: LETConfig, model: list, *, precision: str, on_cpu: bool, phases: Optional[PhasedSchedule] = None
):
    """(optimizer, scheduler) over the model chunks; the loss scale is wired into the model config.
    ``phases``: a two-phase run; the parameters it freezes get parameter groups of their own."""
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
    overrides = None
    if phases is not None:
        # megatron groups parameters by their overrides, and on resume tells the groups apart by
        # (wd_mult, lr_mult, ...): the frozen ones carry a marker and lr_mult 0. megatron-core 0.16's
        # scheduler never reads lr_mult (it sets each group's lr from its max_lr / min_lr), and
        # PhasedScheduler gives these groups lr 0 in phase 1 and the run's lr after it.
        overrides = get_standard_config_overrides(config)
        overrides[ParamKey(attr=phases.frozen_attr)] = {FROZEN_GROUP: True, "lr_mult": 0.0}
    optimizer = get_megatron_optimizer(config, model, config_overrides=overrides, use_gloo_process_groups=on_cpu)
    model[0].config.grad_scale_func = optimizer.scale_loss
    # With phases, the run's schedule covers what follows phase 1.
    span = max(0, train.train_iters - (phases.boundary if phases is not None else 0))
    decay_steps = max(1, span)
    warmup = min(int(round(opt.lr_warmup_fraction * span)), decay_steps - 1)
    scheduler_class = OptimizerParamScheduler if phases is None else partial(PhasedScheduler, phases=phases)
    scheduler = scheduler_class(
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
