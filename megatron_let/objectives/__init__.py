"""What a run learns from besides the data. The trainer holds one :class:`Objective`
(:func:`build_objective` picks it from the config) and calls it at fixed points of a step; it
knows no method's details.

- :class:`~megatron_let.objectives.base.Objective`: plain next-token prediction (NLL): nothing besides the LM loss.
- :class:`~megatron_let.objectives.let.LETObjective`: LET's early-layer alignment to a colocated
  frozen teacher (:mod:`.hook`, :mod:`.teacher`), weighted by λ(step) and released at S_stop.
- :class:`~megatron_let.objectives.kd.KDObjective`: logit distillation (``kd``, ``rkd``, ``salt``)
  from a teacher on the last pipeline stage, on vocab-parallel logits.
- :class:`~megatron_let.objectives.hld.HLDCObjective`: logit distillation plus a hint term on a
  middle layer through a learned regressor (``hldc``), the regressor added to the model by
  :func:`add_trainable_modules` before megatron wraps it.
"""

from __future__ import annotations

from typing import Optional

from megatron_let.config import DISTILLATION_METHODS, HIDDEN_LAYER_METHODS, LETConfig
from megatron_let.flops import Convention, CostSchedule
from megatron_let.objectives.base import Objective, PhasedSchedule, nll_cost_schedule

__all__ = [
    "Objective",
    "add_trainable_modules",
    "build_objective",
    "cost_schedule",
    "phased_schedule",
    "set_budget_phases",
    "trainable_module_keys",
]


def add_trainable_modules(cfg: LETConfig, chunk) -> None:
    """Give a freshly built model chunk (a GPTModel, before megatron's wrappers) the trainable
    parameters the objective adds, so that the optimizer, gradient reduction and checkpoints
    carry them like the model's own."""
    if cfg.objective in HIDDEN_LAYER_METHODS:
        from megatron_let.objectives.hld import add_regressor

        add_regressor(cfg, chunk)


def phased_schedule(cfg: LETConfig) -> Optional[PhasedSchedule]:
    """The run's two lr phases, for an objective that has them (hldf), else None."""
    if cfg.objective == "hldf":
        from megatron_let.objectives.hld import hldf_schedule

        return hldf_schedule(cfg)
    return None


def trainable_module_keys(cfg: LETConfig) -> tuple[str, ...]:
    """Checkpoint-key prefixes of what :func:`add_trainable_modules` adds."""
    if cfg.objective in HIDDEN_LAYER_METHODS:
        from megatron_let.objectives.hld import REGRESSOR

        return (f"{REGRESSOR}.",)
    return ()


def build_objective(cfg: LETConfig, model: list, *, iteration: int, **build) -> Objective:
    """The objective the config asks for, built for this rank (``model``: its chunks)."""
    if cfg.alignment_active:
        from megatron_let.objectives.let import LETObjective

        return LETObjective(cfg, model, iteration=iteration, **build)
    if cfg.objective == "hldf":
        from megatron_let.objectives.hld import HLDFObjective

        return HLDFObjective(cfg, model, iteration=iteration, **build)
    if cfg.objective in HIDDEN_LAYER_METHODS:
        from megatron_let.objectives.hld import HLDCObjective

        return HLDCObjective(cfg, model, iteration=iteration, **build)
    if cfg.objective in DISTILLATION_METHODS:
        from megatron_let.objectives.kd import KDObjective

        return KDObjective(cfg, model, iteration=iteration, **build)
    return Objective()


def cost_schedule(cfg: LETConfig, convention: Convention) -> CostSchedule:
    """The method's training FLOPs per token, step by step (its phases: LET's teacher until
    S_stop, SALT's switch, HLDF's hint phase), in ``convention`` (megatron_let.flops)."""
    if cfg.alignment_active:
        from megatron_let.objectives.let import let_cost_schedule

        return let_cost_schedule(cfg, convention)
    if cfg.objective == "hldf":
        from megatron_let.objectives.hld import hldf_cost_schedule

        return hldf_cost_schedule(cfg, convention)
    if cfg.objective in HIDDEN_LAYER_METHODS:
        from megatron_let.objectives.hld import hldc_cost_schedule

        return hldc_cost_schedule(cfg, convention)
    if cfg.objective in DISTILLATION_METHODS:
        from megatron_let.objectives.kd import kd_cost_schedule

        return kd_cost_schedule(cfg, convention)
    return nll_cost_schedule(cfg, convention)


def set_budget_phases(cfg: LETConfig, convention: Convention, budget: Optional[float]) -> None:
    """Set the iteration counts a method derives from the run's size (``budget`` FLOPs, or
    training.train_iters when None): hldf's phase 1 from hld.phase1_fraction."""
    if cfg.objective == "hldf" and cfg.hld.phase1_fraction is not None:
        from megatron_let.objectives.hld import hldf_phase1_iters

        cfg.hld.phase1_iters = hldf_phase1_iters(cfg, convention, budget)
